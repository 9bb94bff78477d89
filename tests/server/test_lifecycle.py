"""Start-up (503 while loading), graceful shutdown, CLI flag errors, and the load benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from specserve.cli import main
from tests.server.conftest import MODEL, Server

BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0}


def test_503_while_loading_then_graceful_shutdown(tmp_path):
    s = Server("lifecycle", ["--max-num-seqs", "2", "--max-model-len", "256"], tmp_path)
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(s.url + "/health", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            seen.append((r.status_code, r.json()["status"]))
            if r.status_code == 503:
                m = httpx.post(s.url + "/v1/chat/completions", json=BODY, timeout=30)
                if m.status_code == 503:
                    assert m.json()["error"]["code"] == "starting"
            if r.status_code == 200:
                break
            time.sleep(0.05)
        assert (503, "starting") in seen and seen[-1] == (200, "ok"), seen

        body = BODY | {"max_tokens": 24, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with (
            httpx.Client(base_url=s.url, timeout=60) as http,
            http.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            lines = r.iter_lines()
            events = []
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:  # role + two content chunks: mid-stream
                        break
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            try:  # a new client is refused (listening socket closed) or told 503
                late = httpx.post(s.url + "/v1/chat/completions", json=BODY | {"max_tokens": 2}, timeout=5)
                assert late.status_code == 503, late.text
            except httpx.TransportError:
                pass
            events += [x for x in lines if x.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        assert usage["completion_tokens"] == 24  # the request in flight finished in full
        reasons = [c["finish_reason"] for e in events[1:-2] for c in json.loads(e[6:])["choices"] if c["finish_reason"]]
        assert reasons == ["length"]
        assert s.proc.wait(60) == 0
    finally:
        s.stop()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["serve", "--port", "99999"], "--port"),
        (["serve", "--spec", "bogus"], "--spec"),
        (["serve", "--model", "/nonexistent.gguf"], "--model"),
        (["serve", "--max-num-seqs", "0"], "--max-num-seqs"),
        (["serve", "--num-spec-tokens", "4"], "--num-spec-tokens"),
        (["serve", "--host", "256.1.1.1"], "--port"),
        (["serve", "--kv-cache-tokens", "256", "--max-model-len", "512"], "--kv-cache-tokens"),
        (["serve", "--max-num-batched-tokens", "8"], "--max-num-batched-tokens"),
        (["bench", "serve", "--concurrency", "0"], "--concurrency"),
        (["bench", "serve", "--duration", "-1"], "--duration"),
        (["bench", "serve", "--requests", "x"], "--requests"),
        (["bench", "serve", "--max-tokens", "4096"], "--max-tokens"),
    ],
)
def test_cli_flag_errors_are_one_line(args, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], lines


def test_serve_port_in_use(capsys):
    import socket

    with socket.socket() as busy, pytest.raises(SystemExit) as info:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        main(["serve", "--port", str(busy.getsockname()[1])])
    assert info.value.code == 2 and "--port: cannot bind" in capsys.readouterr().err


def test_bench_serve_small(tmp_path, questions_file):
    env = dict(os.environ, SPECSERVE_BENCH_QUESTIONS=str(questions_file), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "specserve.cli", "bench", "serve", "--requests", "6", "--duration", "240"]
    cmd += [
        "--concurrency",
        "3",
        "--max-tokens",
        "6",
        "--n-per-category",
        "1",
        "--categories",
        "writing,math_reasoning",
    ]
    cmd += ["--max-num-seqs", "2", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "PASS: 0 errors, 0 lost or duplicated tokens" in r.stdout
    records = [json.loads(x) for x in (tmp_path / "serve_bench.jsonl").read_text().splitlines()]
    assert [sum(x["config"] == c for x in records) for c in ("plain", "ngram")] == [3, 3]
    assert all(x["error"] is None and x["check"] in ("exact", "near-tie") and x["done"] for x in records)
    assert all(len(x["token_ids"]) == x["usage"]["completion_tokens"] for x in records)
    report = (tmp_path / "serve_bench.md").read_text()
    assert "| plain | 3 | 0 | 0 | 0 |" in report and "| ngram | 3 | 0 | 0 | 0 |" in report
