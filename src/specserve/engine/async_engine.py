"""An asyncio interface over the synchronous `Engine`, for the server.

One background thread owns the engine: it applies the commands queued by the event
loop (add a request, abort one) between steps, runs `engine.step()` while there is work
and sleeps on a condition variable when there is none. After every step it hands each
request's new output (text delta, token ids, logprobs, finish reason, metrics) to that
request's `RequestStream` on the event loop with `loop.call_soon_threadsafe`.

Only the engine thread ever touches the engine, so the event loop never blocks on a
step: `add_request` is a command whose result (the engine's `ValueError` for a bad
prompt, or success) comes back through an asyncio future, and `abort` is a command that
the thread applies before its next step (freeing the request's KV there). The engine
methods used are the public ones only (`add_request`, `step`, `abort`,
`has_unfinished`, `stats`, `requests`, and the `Sequence` read-outs), so a batched
engine with a paged KV cache and a scheduler can replace the internals unchanged.

An exception from `engine.step()` fails every request in flight with `EngineError` (and
aborts them); the thread goes on serving new requests. If aborting fails too, the engine
is marked dead: every waiting and later request gets `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from specserve.engine.engine import Engine
from specserve.engine.sequence import RequestMetrics, Sequence, TokenLogprob
from specserve.sampling.params import SamplingParams

logger = logging.getLogger("specserve.engine")


class EngineError(RuntimeError):
    """The engine failed while this request was in flight."""


class EngineDeadError(EngineError):
    """The engine can no longer serve requests."""


class EngineStoppedError(EngineError):
    """The engine was shut down before this request finished."""


@dataclass
class StreamOutput:
    """What one request produced since its previous output.

    `text`, `token_ids` and `logprobs` are increments; `num_generated` is the total so far.
    `metrics` is a snapshot, set on the final output (`finished`).
    """

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    num_generated: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    metrics: RequestMetrics | None = None
    time: float = field(default_factory=time.perf_counter)


class RequestStream:
    """The outputs of one request, consumed with `async for` on the event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[StreamOutput | BaseException] = asyncio.Queue()
        self.finished = False

    # called on the event loop (through call_soon_threadsafe)
    def _put(self, item: StreamOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[StreamOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StreamOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            if item.finished:
                self.finished = True
            yield item


@dataclass
class _Tracked:
    seq: Sequence
    stream: RequestStream
    num_tokens: int = 0  # output tokens already delivered
    num_logprobs: int = 0


class AsyncEngine:
    """Runs `engine` on a background thread; requests are async streams.

    Args:
        engine: the synchronous engine (the thread becomes its only user).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()  # guards _commands, _stopping
        self._commands: deque[tuple[Any, ...]] = deque()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._streams: dict[str, RequestStream] = {}  # event loop only: requests not yet finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = threading.Event()
        self.dead: BaseException | None = None
        self._stats: dict[str, float | int] = dict(engine.stats())
        self.steps = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread; outputs go to `loop` (default: the running loop)."""
        if self._thread is not None:
            raise RuntimeError("the engine thread is already running")
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="specserve-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet finished (as seen from the event loop)."""
        return len(self._streams)

    def stats(self) -> dict[str, float | int]:
        """The engine's load gauges after its latest step ({running, waiting, kv_usage})."""
        return dict(self._stats)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is unfinished; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._streams:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let the requests in flight finish (abort them after `timeout` s), then stop the thread."""
        if not await self.wait_idle(timeout):
            for request_id in list(self._streams):
                self.abort(request_id)
            await self.wait_idle(5.0)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        for stream in list(self._streams.values()):
            stream._put(EngineStoppedError("the server is shutting down"))
        self._streams.clear()

    # ------------------------------------------------------------------ requests

    async def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; returns its output stream.

        Raises the engine's `ValueError` for a prompt it refuses (empty, too long, bad ids).
        """
        if self.dead is not None:
            raise EngineDeadError(f"the engine failed: {self.dead}")
        if self._thread is None or self._stopping:
            raise EngineStoppedError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop)
        added: asyncio.Future[None] = loop.create_future()
        self._streams[request_id] = stream
        self._submit(("add", request_id, list(prompt_ids), params, stream, added))
        try:
            await added
        except BaseException:
            self._streams.pop(request_id, None)
            if not added.done() or added.cancelled():
                self.abort(request_id)  # cancelled while waiting: the add may still land
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Finish a request now (its KV is freed before the next step). Safe from any thread."""
        self._submit(("abort", request_id))

    def _submit(self, command: tuple[Any, ...]) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._commands and not self._stopping and not self._busy():
                        self._cond.wait()
                    if self._stopping and not self._commands:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._apply(command)
                if self._busy():
                    try:
                        self.engine.step()
                        self.steps += 1
                    except Exception as exc:
                        logger.exception("engine step failed")
                        self._fail_all(EngineError(f"engine step failed: {type(exc).__name__}: {exc}"))
                self._publish()
                self._stats = dict(self.engine.stats())
        except BaseException as exc:
            logger.exception("engine thread crashed")
            self.dead = exc
            self._fail_all(EngineDeadError(f"the engine thread crashed: {type(exc).__name__}: {exc}"))
        finally:
            self._stopped.set()

    def _busy(self) -> bool:
        return self.dead is None and self.engine.has_unfinished()

    def _apply(self, command: tuple[Any, ...]) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt_ids, params, stream, added = command
            if self.dead is not None:
                self._resolve(added, EngineDeadError(f"the engine failed: {self.dead}"))
                return
            try:
                seq = self.engine.add_request(prompt_ids, params, request_id=request_id)
            except ValueError as exc:
                self._resolve(added, exc)
                return
            except Exception as exc:
                logger.exception("add_request failed")
                self._resolve(
                    added,
                    EngineError(f"could not add the request: {type(exc).__name__}: {exc}"),
                )
                return
            self._tracked[request_id] = _Tracked(seq, stream)
            self._resolve(added, None)
        elif kind == "abort":
            tracked = self._tracked.get(command[1])
            if tracked is not None and not tracked.seq.finished:
                try:
                    self.engine.abort(command[1])
                except Exception as exc:
                    logger.exception("abort failed")
                    self.dead = exc
                    self._fail_all(EngineDeadError(f"the engine failed to abort a request: {exc}"))

    def _resolve(self, future: asyncio.Future[None], error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        self._call_soon(settle)

    def _publish(self) -> None:
        """Deliver every tracked request's new output; forget the finished ones."""
        for request_id, tr in list(self._tracked.items()):
            seq = tr.seq
            new_ids = seq.output_ids[tr.num_tokens :]
            new_lps = seq.logprobs[tr.num_logprobs :]
            text = seq.take_delta()
            finished = seq.finished
            if not (new_ids or text or finished):
                continue
            tr.num_tokens += len(new_ids)
            tr.num_logprobs += len(new_lps)
            out = StreamOutput(
                request_id,
                text,
                list(new_ids),
                list(new_lps),
                len(seq.output_ids),
                finished,
                seq.finish_reason if finished else None,
                copy.deepcopy(seq.metrics) if finished else None,
            )
            if finished:
                del self._tracked[request_id]
                self.engine.requests.pop(request_id, None)
            self._deliver(tr.stream, out)

    def _deliver(self, stream: RequestStream, item: StreamOutput | BaseException) -> None:
        def put() -> None:
            stream._put(item)
            done = isinstance(item, BaseException) or item.finished
            if done and self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]

        self._call_soon(put)

    def _call_soon(self, fn) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _fail_all(self, error: EngineError) -> None:
        for request_id, tr in list(self._tracked.items()):
            try:
                self.engine.abort(request_id)
            except Exception as exc:
                logger.exception("abort after a failed step failed")
                if self.dead is None:
                    self.dead = exc
            self.engine.requests.pop(request_id, None)
            self._deliver(tr.stream, error)
        self._tracked.clear()
