"""AsyncEngine over a scripted fake engine (no model): streaming, abort, errors, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from specserve.engine.async_engine import AsyncEngine, EngineError, EngineStoppedError
from specserve.engine.sequence import RequestMetrics, TokenLogprob
from specserve.sampling.params import SamplingParams


class FakeSeq:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt
        self.params = params
        self.output_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.pending = ""
        self.finish_reason: str | None = None
        self.metrics = RequestMetrics(prompt_tokens=len(prompt))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def take_delta(self) -> str:
        delta, self.pending = self.pending, ""
        return delta


class FakeEngine:
    """One token per step per request (two when `burst`); token i has text f"<i>"."""

    def __init__(self, step_time: float = 0.0, burst: bool = False) -> None:
        self.requests: dict[str, FakeSeq] = {}
        self.step_time = step_time
        self.burst = burst
        self.fail_next_step = False
        self.steps = 0

    def add_request(self, prompt_ids, params, request_id=None):
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        seq = FakeSeq(request_id, list(prompt_ids), params)
        self.requests[request_id] = seq
        return seq

    def _active(self):
        return [s for s in self.requests.values() if not s.finished]

    def has_unfinished(self) -> bool:
        return bool(self._active())

    def step(self):
        self.steps += 1
        if self.step_time:
            time.sleep(self.step_time)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        active = self._active()
        for seq in active:
            for _ in range(2 if self.burst else 1):
                i = len(seq.output_ids)
                seq.output_ids.append(i)
                if seq.params.logprobs is not None:
                    seq.logprobs.append(TokenLogprob(i, -0.5, [(i, -0.5)]))
                seq.pending += f"<{i}>"
                seq.metrics.generated_tokens += 1
                if len(seq.output_ids) >= seq.params.max_tokens:
                    seq.finish_reason = "length"
                    break
        return active

    def abort(self, request_id):
        seq = self.requests.get(request_id)
        if seq is not None and not seq.finished:
            seq.finish_reason = "abort"

    def stats(self):
        return {"running": len(self._active()), "waiting": 0, "kv_usage": 0.1 * len(self._active())}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def collect(stream):
    return [out async for out in stream]


def test_stream_delivers_every_token_once():
    async def main():
        engine = FakeEngine(burst=True)
        ae = AsyncEngine(engine)
        ae.start()
        streams = [
            await ae.add_request(f"r{i}", [1, 2], SamplingParams(max_tokens=5 + i, logprobs=0)) for i in range(3)
        ]
        outs = await asyncio.gather(*(collect(s) for s in streams))
        for i, seq_outs in enumerate(outs):
            n = 5 + i
            assert [t for o in seq_outs for t in o.token_ids] == list(range(n))
            assert "".join(o.text for o in seq_outs) == "".join(f"<{k}>" for k in range(n))
            assert [lp.token_id for o in seq_outs for lp in o.logprobs] == list(range(n))
            assert [o.finished for o in seq_outs] == [False] * (len(seq_outs) - 1) + [True]
            assert seq_outs[-1].finish_reason == "length" and seq_outs[-1].metrics.generated_tokens == n
            assert seq_outs[-1].num_generated == n
        assert engine.requests == {}  # finished requests are popped from the engine
        assert ae.num_unfinished == 0
        await ae.shutdown(1)
        assert not ae.running

    run(main())


def test_abort_finishes_the_request_and_frees_it():
    async def main():
        engine = FakeEngine(step_time=0.01)
        ae = AsyncEngine(engine)
        ae.start()
        stream = await ae.add_request("a", [1], SamplingParams(max_tokens=10_000))
        first = await stream.__aiter__().__anext__()
        assert first.token_ids == [0]
        ae.abort("a")
        rest = await collect(stream)
        assert rest[-1].finished and rest[-1].finish_reason == "abort"
        assert engine.requests == {} and ae.num_unfinished == 0
        ae.abort("a")  # aborting a finished or unknown request is harmless
        ae.abort("nope")
        await ae.shutdown(1)

    run(main())


def test_step_exception_reaches_the_request_and_the_engine_goes_on():
    async def main():
        engine = FakeEngine()
        ae = AsyncEngine(engine)
        ae.start()
        engine.fail_next_step = True
        stream = await ae.add_request("a", [1], SamplingParams(max_tokens=3))
        with pytest.raises(EngineError, match="boom"):
            await collect(stream)
        assert engine.requests == {} and ae.num_unfinished == 0
        ok = await collect(await ae.add_request("b", [1], SamplingParams(max_tokens=3)))
        assert ok[-1].finish_reason == "length"
        await ae.shutdown(1)

    run(main())


def test_add_request_errors_and_duplicate_ids():
    async def main():
        ae = AsyncEngine(FakeEngine(step_time=0.01))
        ae.start()
        with pytest.raises(ValueError, match="empty"):
            await ae.add_request("a", [], SamplingParams())
        assert ae.num_unfinished == 0
        s = await ae.add_request("b", [1], SamplingParams(max_tokens=50))
        with pytest.raises(ValueError, match="already in use"):
            await ae.add_request("b", [1], SamplingParams())
        ae.abort("b")
        await collect(s)
        await ae.shutdown(1)
        with pytest.raises(EngineStoppedError):
            await ae.add_request("c", [1], SamplingParams())

    run(main())


def test_steps_never_block_the_event_loop():
    async def main():
        ae = AsyncEngine(FakeEngine(step_time=0.2))
        ae.start()
        stream = await ae.add_request("a", [1], SamplingParams(max_tokens=5))
        gaps = []
        consumer = asyncio.create_task(collect(stream))
        last = time.perf_counter()
        while not consumer.done():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        assert max(gaps) < 0.15  # a 0.2 s step runs on the engine thread, not on the loop
        await ae.shutdown(1)

    run(main())


def test_shutdown_lets_requests_finish_then_aborts_after_the_timeout():
    async def main():
        ae = AsyncEngine(FakeEngine(step_time=0.01))
        ae.start()
        short = await ae.add_request("s", [1], SamplingParams(max_tokens=5))
        consumer = asyncio.create_task(collect(short))
        await ae.shutdown(5)
        assert (await consumer)[-1].finish_reason == "length"  # finished, not aborted

        ae = AsyncEngine(FakeEngine(step_time=0.01))
        ae.start()
        long = await ae.add_request("l", [1], SamplingParams(max_tokens=100_000))
        consumer = asyncio.create_task(collect(long))
        await ae.shutdown(0.2)
        assert (await consumer)[-1].finish_reason == "abort"

    run(main())
