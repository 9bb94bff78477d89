"""`specserve bench serve`: a load test of the HTTP server, speculation off vs. on.

For each configuration (plain decoding, then the speculative method) a real
`specserve serve` process is started on loopback. Its workload is the first turns of the
selected Spec-Bench questions as chat requests, greedy, `max_tokens` each:

1. reference: every prompt once, non-streamed, `concurrency` at a time;
2. load: `concurrency` clients each send streamed requests back to back (prompts in
   turn) until the configuration's share of `requests` is sent or its share of
   `duration` is over; the clients still streaming then disconnect (those requests are
   "cut": counted for tokens/s, not checked).

Every streamed answer is checked against the same server's non-streamed answer for the
same prompt. Both ask for the token ids (`return_tokens_as_token_ids`) with top-2
logprobs. A streamed answer passes when its token ids and text equal the reference's,
its `usage.completion_tokens` equals the tokens it streamed, and it ended with a finish
reason, a usage chunk and `[DONE]`. Batching changes the rounding of a forward (much more
so in bf16 than in fp32), so a greedy answer computed in a different batch may take the
other branch of a numerical near-tie: a divergence is accepted (and counted as a near-tie)
only when, at the first differing token, the reference's top-2 logprobs differ by less than
the dtype's tolerance (`specserve.equivalence.NEAR_TIE`) and the streamed token is the
reference's runner-up. A dropped or repeated chunk cannot pass that test: it would need
the next token to be the reference's exact runner-up at a near-tie.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from specserve.bench.common import select_questions
from specserve.bench.workload import Question

MODEL_NAME = "bench"


@dataclass
class Reference:
    prompt_index: int
    token_ids: list[int]
    text: str
    top2: list[list[tuple[int, float]]]  # per token: [(id, logprob), ...] best first
    finish_reason: str | None


@dataclass
class StreamRecord:
    config: str
    request: int
    prompt_index: int
    start: float
    ttft_s: float | None = None
    latency_s: float | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    itl_s: list[float] = field(default_factory=list)  # per token (a chunk of k tokens: gap/k, k times)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    error: str | None = None
    check: str | None = None  # "exact" | "near-tie" | "mismatch: ..." | None (not checked)
    cut: bool = False  # still streaming at the deadline: the client disconnected


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_id(token: str) -> int:
    if not token.startswith("token_id:"):
        raise ValueError(f"expected a 'token_id:N' token, got {token!r}")
    return int(token.removeprefix("token_id:"))


class ServerProcess:
    """`specserve serve` in a child process on a free loopback port."""

    def __init__(self, args: list[str], log_path: Path, timeout: float = 600.0) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "specserve.cli",
            "serve",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *args,
        ]
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - open while the process lives
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(f"the server exited with code {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not become healthy in {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:]) or "(empty log)"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def _body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "return_tokens_as_token_ids": True,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def _reference(client: httpx.AsyncClient, index: int, prompt: str, max_tokens: int) -> Reference | str:
    r = await client.post("/v1/chat/completions", json=_body(prompt, max_tokens, stream=False))
    if r.status_code != 200:
        return f"HTTP {r.status_code}: {r.text[:200]}"
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    return Reference(
        index,
        [_token_id(e["token"]) for e in content],
        choice["message"]["content"],
        [[(_token_id(t["token"]), t["logprob"]) for t in e["top_logprobs"]] for e in content],
        choice["finish_reason"],
    )


async def _stream(client: httpx.AsyncClient, rec: StreamRecord, prompt: str, max_tokens: int) -> None:
    t0 = time.perf_counter()
    last: float | None = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=_body(prompt, max_tokens, stream=True)) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    rec.error = f"not an SSE data line: {line[:80]!r}"
                    return
                data = line[6:]
                if data == "[DONE]":
                    rec.done = True
                    continue
                if rec.done:
                    rec.error = "data after [DONE]"
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = f"error event: {chunk['error'].get('message')}"
                    return
                if chunk.get("usage"):
                    rec.usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    now = time.perf_counter()
                    lps = (choice.get("logprobs") or {}).get("content") or []
                    ids = [_token_id(e["token"]) for e in lps]
                    if ids:
                        if rec.ttft_s is None:
                            rec.ttft_s = now - t0
                        else:
                            rec.itl_s.extend([(now - last) / len(ids)] * len(ids))
                        last = now
                        rec.token_ids.extend(ids)
                    rec.text += (choice.get("delta") or {}).get("content") or ""
                    if choice.get("finish_reason") is not None:
                        if rec.finish_reason is not None:
                            rec.error = "two finish reasons"
                        rec.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        rec.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    except asyncio.CancelledError:
        rec.cut = True
        raise
    finally:
        rec.latency_s = time.perf_counter() - t0


def check(rec: StreamRecord, ref: Reference, tolerance: float) -> str:
    """'exact', 'near-tie', or 'mismatch: ...' (see the module docstring)."""
    if not rec.done:
        return "mismatch: no [DONE]"
    if rec.finish_reason is None:
        return "mismatch: no finish_reason"
    if rec.usage is None:
        return "mismatch: no usage chunk"
    if rec.usage.get("completion_tokens") != len(rec.token_ids):
        return f"mismatch: usage says {rec.usage.get('completion_tokens')} tokens, {len(rec.token_ids)} streamed"
    if rec.token_ids == ref.token_ids:
        if rec.text != ref.text:
            return "mismatch: same tokens, different text"
        if rec.finish_reason != ref.finish_reason:
            return "mismatch: same tokens, different finish_reason"
        return "exact"
    i = next(
        (k for k, (a, b) in enumerate(zip(rec.token_ids, ref.token_ids)) if a != b),
        None,
    )
    if i is None:
        return f"mismatch: {len(rec.token_ids)} tokens streamed, the reference has {len(ref.token_ids)} (same prefix)"
    top = ref.top2[i]
    if len(top) < 2:
        return f"mismatch at token {i}: the reference has no runner-up"
    margin = abs(top[0][1] - top[1][1])
    # the streamed token must be the reference's other top-2 token (an exact tie may be listed either way round)
    if margin < tolerance and rec.token_ids[i] in (top[0][0], top[1][0]):
        return "near-tie"
    return f"mismatch at token {i}: streamed {rec.token_ids[i]}, reference {ref.token_ids[i]} (margin {margin:.3g})"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def _run_config(
    name: str,
    url: str,
    prompts: list[str],
    n_requests: int,
    time_budget: float,
    concurrency: int,
    max_tokens: int,
    tolerance: float,
) -> dict[str, Any]:
    started = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(connect=30.0, read=600.0, write=30.0, pool=600.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        # 1. references (they also warm the server up)
        sem = asyncio.Semaphore(concurrency)

        async def ref(i: int) -> Reference | str:
            async with sem:
                return await _reference(client, i, prompts[i], max_tokens)

        results = await asyncio.gather(*(ref(i) for i in range(len(prompts))))
        refs = {r.prompt_index: r for r in results if isinstance(r, Reference)}
        ref_errors = [r for r in results if not isinstance(r, Reference)]
        usable = sorted(refs)
        if not usable:
            raise RuntimeError(f"{name}: no reference request succeeded: {ref_errors[:1]}")
        ref_time = time.monotonic() - started
        deadline = time.monotonic() + time_budget  # the budget is for the streamed traffic

        # 2. load
        records: list[StreamRecord] = []
        counter = iter(range(n_requests))
        t_load = time.perf_counter()

        async def client_loop() -> None:
            for k in counter:
                p = usable[k % len(usable)]
                rec = StreamRecord(name, k, p, time.perf_counter() - t_load)
                records.append(rec)
                await _stream(client, rec, prompts[p], max_tokens)

        # at the deadline the clients still streaming disconnect: their requests are cut, not checked
        tasks = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
        _, late = await asyncio.wait(tasks, timeout=max(deadline - time.monotonic(), 0.0))
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        load_wall = time.perf_counter() - t_load
        health = await _wait_idle(client, 60.0)

    for rec in records:
        if rec.error is None and not rec.cut:
            rec.check = check(rec, refs[rec.prompt_index], tolerance)
    errors = [r for r in records if r.error is not None]
    complete = [r for r in records if not r.cut]
    mismatches = [r for r in records if r.check is not None and r.check.startswith("mismatch")]
    tokens = sum(len(r.token_ids) for r in records)
    spec = [r.usage.get("speculation") or {} for r in records if r.usage]
    fwd = sum(s.get("forward_passes") or 0 for s in spec)
    drafted = sum(s.get("drafted_tokens") or 0 for s in spec)
    accepted = sum(s.get("accepted_tokens") or 0 for s in spec)
    gen = sum(r.usage.get("completion_tokens", 0) for r in records if r.usage)
    ttft = [r.ttft_s for r in complete if r.ttft_s is not None]
    itl = [x for r in records for x in r.itl_s]
    return {
        "config": name,
        "prompts": len(usable),
        "reference_errors": ref_errors,
        "reference_s": ref_time,
        "requests": len(complete),
        "cut": len(records) - len(complete),
        "errors": len(errors),
        "error_examples": [r.error for r in errors[:3]],
        "mismatches": len(mismatches),
        "mismatch_examples": [r.check for r in mismatches[:3]],
        "exact": sum(r.check == "exact" for r in records),
        "near_ties": sum(r.check == "near-tie" for r in records),
        "tokens": tokens,
        "load_s": load_wall,
        "tokens_per_s": tokens / load_wall if load_wall > 0 else None,
        "ttft_p50_ms": _ms(_percentile(ttft, 0.5)),
        "ttft_p99_ms": _ms(_percentile(ttft, 0.99)),
        "itl_p50_ms": _ms(_percentile(itl, 0.5)),
        "itl_p99_ms": _ms(_percentile(itl, 0.99)),
        "acceptance_length": gen / fwd if fwd else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "idle_after": {k: health.get(k) for k in ("running", "waiting", "unfinished", "kv_usage")},
        "records": records,
    }


async def _wait_idle(client: httpx.AsyncClient, timeout: float) -> dict[str, Any]:
    """/health once the server has nothing unfinished (the cut requests are aborted), or after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        health = (await client.get("/health")).json()
        if health.get("unfinished") == 0 or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.2)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def run_serve_bench(
    model: str | None,
    dtype: str | None,
    spec: str,
    num_spec_tokens: int | None,
    requests: int,
    duration: float,
    concurrency: int,
    max_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    n_per_category: int,
    categories: list[str] | None,
    out_dir: str,
    questions_path: str | None = None,
    stdout=None,
) -> dict[str, Any]:
    """Run the benchmark; returns the report (`ok` is False on any error or mismatch)."""
    import torch

    from specserve.api import resolve_dtype
    from specserve.equivalence import NEAR_TIE

    stdout = stdout or sys.stdout
    questions: list[Question] = select_questions(questions_path, n_per_category, categories)
    prompts = [q.turns[0] for q in questions]
    resolved = resolve_dtype(dtype, torch.device("cpu"))
    tolerance = NEAR_TIE[resolved]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--served-model-name", MODEL_NAME, "--max-num-seqs", str(max_num_seqs)]
    common += [
        "--max-model-len",
        str(max_model_len),
        "--max-queue",
        str(max(concurrency, 1)),
        "--device",
        "cpu",
    ]
    common += ["--dtype", str(resolved).removeprefix("torch.")]
    if model is not None:
        common += ["--model", model]
    spec_args = ["--spec", spec] + ([] if num_spec_tokens is None else ["--num-spec-tokens", str(num_spec_tokens)])
    configs = [("plain", common), (spec, common + spec_args)]
    share_requests = [requests // len(configs) + (i < requests % len(configs)) for i in range(len(configs))]
    share_time = duration / len(configs)
    results = []
    raw_path = out / "serve_bench.jsonl"
    with open(raw_path, "w", encoding="utf-8") as raw:
        for (name, args), n in zip(configs, share_requests):
            print(f"[{name}] starting the server ...", file=stdout, flush=True)
            server = ServerProcess(args, out / f"server_{name.replace(':', '_').replace('/', '_')}.log")
            try:
                print(
                    f"[{name}] {n} requests or {share_time:.0f} s, {concurrency} clients",
                    file=stdout,
                    flush=True,
                )
                result = asyncio.run(
                    _run_config(
                        name,
                        server.url,
                        prompts,
                        n,
                        share_time,
                        concurrency,
                        max_tokens,
                        tolerance,
                    )
                )
            finally:
                code = server.stop()
            result["server_exit_code"] = code
            raw.writelines(json.dumps(asdict(rec)) + "\n" for rec in result.pop("records"))
            results.append(result)
            print(
                f"[{name}] {result['requests']} requests (+{result['cut']} cut at the deadline), {result['errors']} errors, "
                f"{result['mismatches']} mismatches, "
                f"{_fmt(result['tokens_per_s'])} tok/s",
                file=stdout,
                flush=True,
            )
    ok = all(
        r["errors"] == 0
        and r["mismatches"] == 0
        and not r["reference_errors"]
        and r["server_exit_code"] == 0
        and r["idle_after"]["unfinished"] == 0
        and r["requests"] > 0
        for r in results
    )
    report = _markdown(results, resolved, concurrency, max_tokens, max_num_seqs, len(prompts), ok)
    (out / "serve_bench.md").write_text(report, encoding="utf-8")
    print(report, file=stdout)
    print(f"raw records: {raw_path}", file=stdout)
    return {"ok": ok, "results": results, "report": report}


def _markdown(results, dtype, concurrency, max_tokens, max_num_seqs, n_prompts, ok) -> str:
    title = (
        f"specserve bench serve: {concurrency} concurrent streaming clients, greedy chat, max_tokens {max_tokens}, "
        f"{n_prompts} Spec-Bench prompts, server max_num_seqs {max_num_seqs}, {str(dtype).removeprefix('torch.')}, "
        f"{os.cpu_count()} CPUs"
    )
    head = (
        "| config | requests | cut at deadline | errors | lost/dup/mismatched | exact | near-ties | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | tokens | tok/s | AL | acceptance | idle after |"
    )
    lines = [title, "", head, "|---" * 14 + "|"]
    for r in results:
        idle = r["idle_after"]
        lines.append(
            f"| {r['config']} | {r['requests']} | {r['cut']} | {r['errors']} | {r['mismatches']} | {r['exact']} | {r['near_ties']} "
            f"| {_fmt(r['ttft_p50_ms'], 0)} / {_fmt(r['ttft_p99_ms'], 0)} | {_fmt(r['itl_p50_ms'])} / "
            f"{_fmt(r['itl_p99_ms'])} | {r['tokens']} | {_fmt(r['tokens_per_s'])} | {_fmt(r['acceptance_length'], 2)} "
            f"| {_fmt(None if r['acceptance_rate'] is None else r['acceptance_rate'] * 100)}% "
            f"| running {idle['running']}, waiting {idle['waiting']}, kv {_fmt(idle['kv_usage'], 3)} |"
        )
    if len(results) == 2 and results[0]["tokens_per_s"] and results[1]["tokens_per_s"]:
        lines += [
            "",
            f"speculation on / off, total tokens/s: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x",
        ]
    for r in results:
        for label, items in (
            ("reference errors", r["reference_errors"]),
            ("errors", r["error_examples"]),
            ("mismatches", r["mismatch_examples"]),
        ):
            if items:
                lines.append(f"- {r['config']} {label}: {'; '.join(str(x) for x in items[:3])}")
    lines += [""] + [
        f"- {r['config']}: references (every prompt once, non-streamed) {r['reference_s']:.0f} s, "
        f"streamed traffic {r['load_s']:.0f} s, server exit code {r['server_exit_code']}"
        for r in results
    ]
    verdict = "PASS: 0 errors, 0 lost or duplicated tokens" if ok else "FAIL: errors, mismatches or no checked request"
    lines += ["", verdict]
    return "\n".join(lines) + "\n"
