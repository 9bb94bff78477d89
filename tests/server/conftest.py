"""Real `specserve serve` processes for the server tests, in a dtype where batching cannot
flip a greedy token (the tests compare outputs across requests and servers): bf16 on the
row-invariant native layers where the CPU runs them (the served default), else float32."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

MODEL = "test-model"
API_KEY = "test-key-123"
# SPECSERVE_SERVER_TEST_DEVICE=cuda runs the same server tests on a GPU (the device check does)
DEVICE = os.environ.get("SPECSERVE_SERVER_TEST_DEVICE", "cpu")


def _exact_dtype() -> str:
    if DEVICE != "cpu":
        return "float32"
    from specserve.model import native

    return "bfloat16" if native.library() is not None else "float32"


DTYPE = _exact_dtype()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, args: list[str], log_dir: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_dir / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "specserve.cli",
            "serve",
            "--port",
            str(self.port),
            "--served-model-name",
            MODEL,
        ]
        cmd += [
            "--dtype",
            DTYPE,
            "--device",
            DEVICE,
            "--log-level",
            "warning",
            *args,
        ]
        if api_key is not None:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, OMP_NUM_THREADS="1")  # several servers share 2 cores
        self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 - open while the process lives
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail(f"server not healthy after {timeout} s: {self.log_path.read_text()[-2000:]}")

    def client(self, api_key: str | None = None, **kw) -> openai.OpenAI:
        key = api_key if api_key is not None else (self.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def async_client(self, **kw) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url + "/v1",
            api_key=self.api_key or "unused",
            max_retries=0,
            timeout=120,
            **kw,
        )

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=10).text

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


# Started together at session start (loading overlaps), stopped at the end.
SERVERS = {
    # the general server: protocol, errors, fuzzing, disconnects
    "plain": (
        ["--max-num-seqs", "4", "--max-model-len", "512", "--max-tokens-limit", "64"],
        None,
    ),
    # speculation on, with an API key
    "spec": (
        ["--max-num-seqs", "4", "--max-model-len", "512", "--spec", "ngram"],
        API_KEY,
    ),
    # tiny limits: one running sequence, one waiting, 4 KiB bodies
    "tiny": (
        [
            "--max-num-seqs",
            "1",
            "--max-queue",
            "1",
            "--max-model-len",
            "512",
            "--max-request-bytes",
            "4096",
        ],
        None,
    ),
}


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("server-logs")
    started = {name: Server(name, args, log_dir, key) for name, (args, key) in SERVERS.items()}
    try:
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture(scope="session")
def server(servers) -> Server:
    return servers["plain"]


@pytest.fixture(scope="session")
def spec_server(servers) -> Server:
    return servers["spec"]


@pytest.fixture(scope="session")
def tiny_server(servers) -> Server:
    return servers["tiny"]


@pytest.fixture(scope="session")
def client(server):
    return server.client()
