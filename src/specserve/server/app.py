"""The OpenAI-compatible HTTP server: FastAPI routes over the `AsyncEngine`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,
GET /v1/models/{id}, GET /health, GET /metrics. Errors are OpenAI error JSON
(`{"error": {"message", "type", "param", "code"}}`), never a traceback.

Every request holds its engine requests only while its HTTP exchange lasts: when the
client goes away (mid-stream or while a non-streamed answer is being computed) its
sequences are aborted and their KV freed before the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from specserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineError,
    EngineStoppedError,
    RequestStream,
    StreamOutput,
)
from specserve.engine.sequence import RequestMetrics, TokenLogprob
from specserve.sampling.params import SamplingParams
from specserve.server.metrics import CONTENT_TYPE, ServerMetrics
from specserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    check_neutral,
    validation_error,
)

logger = logging.getLogger("specserve.server")

#: Logprob floor: -inf is not JSON (vLLM uses the same floor).
LOGPROB_FLOOR = -9999.0
#: OpenAI's default max_tokens for /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass
class ServerConfig:
    """Limits and identity of one server.

    Args:
        model_name: the id clients pass as `model` (and /v1/models lists).
        api_key: when set, /v1/* needs `Authorization: Bearer <api_key>` (else 401).
        max_queue: sequences that may wait for a place in the running batch; beyond
            `max_num_seqs + max_queue` unfinished sequences a request gets 429.
        max_request_bytes: largest request body (else 413).
        max_tokens_limit: largest `max_tokens` a request may ask for (None: the context limit).
        shutdown_timeout: seconds to let requests in flight finish on shutdown before aborting them.
    """

    model_name: str
    api_key: str | None = None
    max_queue: int = 256
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int | None = None
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be non-empty")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")


@dataclass
class ServerState:
    config: ServerConfig
    llm: Any = None  # specserve.api.LLM once loaded
    engine: AsyncEngine | None = None
    ready: bool = False
    draining: bool = False
    load_error: BaseException | None = None
    started: float = field(default_factory=time.time)
    metrics: ServerMetrics | None = None
    token_text: dict[int, str] = field(default_factory=dict)

    def gauges(self) -> dict[str, float]:
        stats: dict[str, float] = {
            "ready": float(self.ready),
            "draining": float(self.draining),
        }
        if self.engine is not None:
            stats.update({k: float(v) for k, v in self.engine.stats().items()})
            stats["unfinished"] = float(self.engine.num_unfinished)
        return stats

    def token_str(self, token_id: int) -> str:
        text = self.token_text.get(token_id)
        if text is None:
            text = self.llm.tokenizer.decode([token_id]) if self.llm.tokenizer is not None else ""
            self.token_text[token_id] = text
        return text


# ---------------------------------------------------------------- app


def create_app(
    config: ServerConfig,
    loader: Callable[[], Any],
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The ASGI app. `loader()` returns a `specserve.LLM`; it runs on a thread at startup
    (the server answers 503 until it is done). `on_load_error` is called on the event loop
    if it raises."""
    state = ServerState(config)
    state.metrics = ServerMetrics(state.gauges)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def load() -> None:
            try:
                llm = loader()
            except BaseException as exc:  # noqa: BLE001 - reported by on_load_error
                loop.call_soon_threadsafe(_load_failed, exc)
                return
            loop.call_soon_threadsafe(_loaded, llm)

        def _loaded(llm: Any) -> None:
            if state.draining:
                return
            state.llm = llm
            state.engine = AsyncEngine(llm.engine)
            state.engine.start(loop)
            state.ready = True
            logger.info("ready: %s", config.model_name)

        def _load_failed(exc: BaseException) -> None:
            state.load_error = exc
            if on_load_error is not None:
                on_load_error(exc)

        threading.Thread(target=load, name="specserve-load", daemon=True).start()
        try:
            yield
        finally:
            state.draining = True
            state.ready = False
            if state.engine is not None:
                await state.engine.shutdown(config.shutdown_timeout)

    app = FastAPI(title="specserve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.specserve = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(
            APIError(
                exc.status_code,
                message,
                code="not_found" if exc.status_code == 404 else None,
            )
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error ({type(exc).__name__})"))

    @app.get("/health")
    async def health() -> JSONResponse:
        g = state.gauges()
        body: dict[str, Any] = {
            "status": "ok",
            "model": config.model_name,
            "running": int(g.get("running", 0)),
            "waiting": int(g.get("waiting", 0)),
            "unfinished": int(g.get("unfinished", 0)),
            "kv_usage": g.get("kv_usage", 0.0),
        }
        if state.engine is not None and state.engine.dead is not None:
            body["status"] = "dead"
        elif state.draining:
            body["status"] = "draining"
        elif not state.ready:
            body["status"] = "starting" if state.load_error is None else "failed"
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        llm = state.llm
        return {
            "id": config.model_name,
            "object": "model",
            "created": int(state.started),
            "owned_by": "specserve",
            "max_model_len": llm.max_model_len,
            "speculation": llm.spec,
        }

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != config.model_name:
            raise APIError(
                404,
                f"the model '{model_id}' does not exist",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        arrival = time.perf_counter()
        body = await read_json(request, config.max_request_bytes)
        check_neutral(body, chat=True)
        req = parse(ChatCompletionRequest, body)
        check_model(state, req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if (
            req.max_tokens is not None
            and req.max_completion_tokens is not None
            and req.max_tokens != req.max_completion_tokens
        ):
            raise APIError(
                400,
                "give 'max_completion_tokens' or 'max_tokens', not two different values",
                param="max_tokens",
            )
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        prompt_ids = await asyncio.to_thread(render_chat, state.llm, messages)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = resolve_max_tokens(state, requested, len(prompt_ids), None)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await generate(state, request, "chat", req, [prompt_ids], [max_tokens], logprobs, arrival)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        arrival = time.perf_counter()
        body = await read_json(request, config.max_request_bytes)
        check_neutral(body, chat=False)
        req = parse(CompletionRequest, body)
        check_model(state, req.model)
        prompts = await asyncio.to_thread(encode_prompts, state.llm, req.prompt)
        max_tokens = [
            resolve_max_tokens(state, req.max_tokens, len(p), COMPLETIONS_DEFAULT_MAX_TOKENS) for p in prompts
        ]
        return await generate(
            state,
            request,
            "completion",
            req,
            prompts,
            max_tokens,
            req.logprobs,
            arrival,
        )

    return Gate(app, state)


# ---------------------------------------------------------------- the gate (auth, readiness, counts)


class Gate:
    """ASGI wrapper: API key (401) and readiness (503) for /v1/*, request counts for all routes."""

    ROUTES = (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/metrics",
    )

    def __init__(self, app: FastAPI, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.config.api_key
        self._expected = None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        route = next((r for r in self.ROUTES if path == r or path.startswith(r + "/")), "other")
        status: list[int] = []

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await error_response(refusal)(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.state.metrics.http_requests.labels(route, str(status[0] if status else 0)).inc()

    def _refusal(self, scope: Scope, path: str) -> APIError | None:
        if not (path == "/v1" or path.startswith("/v1/")):
            return None
        if self._expected is not None:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                return APIError(
                    401,
                    "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
        st = self.state
        if st.draining:
            return APIError(503, "the server is shutting down", code="draining")
        if not st.ready:
            if st.load_error is not None:
                return APIError(
                    503,
                    f"the model failed to load: {st.load_error}",
                    code="load_failed",
                )
            return APIError(503, "the model is still loading; retry shortly", code="starting")
        if st.engine is not None and st.engine.dead is not None:
            return APIError(503, f"the engine failed: {st.engine.dead}", code="engine_dead")
        return None


def error_response(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


# ---------------------------------------------------------------- request parsing


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def parse(model: type, body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise APIError(400, "the request is nested too deeply") from None


def check_model(state: ServerState, name: str) -> None:
    if name != state.config.model_name:
        raise APIError(
            400,
            f"the model '{name}' is not served here; this server serves '{state.config.model_name}'",
            param="model",
            code="model_not_found",
        )


def render_chat(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    import jinja2

    try:
        return llm.chat_prompt(messages)
    except (ValueError, TypeError, jinja2.TemplateError) as exc:
        raise APIError(
            400,
            f"cannot render the messages with the chat template: {_one_line(exc)}",
            param="messages",
        ) from None


def encode_prompts(llm: Any, prompt: str | list[str] | list[list[int]]) -> list[list[int]]:
    items = [prompt] if isinstance(prompt, str) else prompt
    vocab = llm.config.vocab_size
    out = []
    for item in items:
        if isinstance(item, str):
            try:
                ids = llm.encode(item)
            except (ValueError, TypeError) as exc:
                raise APIError(400, _one_line(exc), param="prompt") from None
        else:
            if min(item) < 0 or max(item) >= vocab:
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            ids = item
        if not ids:
            raise APIError(400, "the prompt is empty: at least one token is needed", param="prompt")
        out.append(ids)
    return out


def resolve_max_tokens(state: ServerState, requested: int | None, prompt_len: int, default: int | None) -> int:
    max_len = state.llm.max_model_len
    room = max_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"this model's maximum context length is {max_len} tokens; the prompt has {prompt_len} tokens, "
            "which leaves no room for a completion",
            param="messages",
            code="context_length_exceeded",
        )
    limit = state.config.max_tokens_limit
    if requested is not None:
        if limit is not None and requested > limit:
            raise APIError(
                400,
                f"max_tokens is {requested}; this server allows at most {limit}",
                param="max_tokens",
            )
        if requested > room:
            raise APIError(
                400,
                f"this model's maximum context length is {max_len} tokens; you requested {prompt_len + requested} "
                f"tokens ({prompt_len} in the prompt, {requested} for the completion)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested
    value = room if default is None else min(default, room)
    return value if limit is None else min(value, limit)


def sampling_params(req: Any, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    seed = None if req.seed is None else req.seed + choice  # n > 1: distinct, reproducible choices
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "seed": seed,
        "stop": req.stop_list(),
        "stop_token_ids": req.stop_token_ids or (),
        "ignore_eos": bool(req.ignore_eos),
        "logprobs": logprobs,
    }
    if req.top_k is not None:
        kwargs["top_k"] = req.top_k
    if req.min_p is not None:
        kwargs["min_p"] = req.min_p
    if req.repetition_penalty is not None:
        kwargs["repetition_penalty"] = req.repetition_penalty
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        message = str(exc)
        param = message.split(" ", 1)[0]
        if param == "logprobs" and isinstance(req, ChatCompletionRequest):
            param = "top_logprobs"
        if param == "seed" and req.seed is not None:
            message = f"seed must be in [0, 2**64 - {req.n}) (each of the n choices uses seed + index), got {req.seed}"
        raise APIError(400, message, param=param if param in type(req).model_fields else None) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------- generation


@dataclass
class Choice:
    index: int
    request_id: str
    prompt_tokens: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    metrics: RequestMetrics | None = None
    first_time: float | None = None
    last_time: float | None = None
    lp_chars: int = 0  # characters of the token strings streamed in logprobs so far (text_offset)


class Generation:
    """The engine requests of one HTTP request (n choices x prompts) and their accounting."""

    def __init__(self, state: ServerState, kind: str, req: Any, arrival: float) -> None:
        self.state = state
        self.kind = kind  # "chat" | "completion"
        self.req = req
        self.arrival = arrival
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices: list[Choice] = []
        self.streams: list[RequestStream] = []
        self.as_ids = bool(req.return_tokens_as_token_ids)

    async def start(self, prompts: list[list[int]], max_tokens: list[int], logprobs: int | None) -> None:
        state, req = self.state, self.state.config
        engine = state.engine
        n = self.req.n
        total = n * len(prompts)
        capacity = state.llm.max_num_seqs + req.max_queue
        if total > capacity:
            raise APIError(
                400,
                f"the request asks for {total} sequences (n x prompts); this server takes at most {capacity} at once",
                param="n",
            )
        if engine.num_unfinished + total > capacity:
            state.metrics.rejected.inc()
            raise APIError(
                429,
                f"the server is at capacity ({engine.num_unfinished} sequences unfinished, limit {capacity}); retry later",
                code="queue_full",
                type_="rate_limit_error",
            )
        params = [[sampling_params(self.req, mt, logprobs, j) for j in range(n)] for mt in max_tokens]
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    choice = Choice(p * n + j, f"{self.id}-{p * n + j}", len(ids))
                    stream = await engine.add_request(choice.request_id, ids, params[p][j])
                    self.choices.append(choice)
                    self.streams.append(stream)
                    state.metrics.prompt_tokens.inc(len(ids))
        except ValueError as exc:
            self.abort_unfinished()
            raise APIError(
                400,
                _one_line(exc),
                param="messages" if self.kind == "chat" else "prompt",
            ) from None
        except (EngineDeadError, EngineStoppedError) as exc:
            self.abort_unfinished()
            raise APIError(503, _one_line(exc), code="engine_unavailable") from None
        except EngineError as exc:
            self.abort_unfinished()
            raise APIError(500, _one_line(exc), code="engine_error") from None
        except BaseException:
            self.abort_unfinished()
            raise

    def abort_unfinished(self) -> None:
        """Abort what has not finished (client gone, error); counts them as aborted."""
        engine = self.state.engine
        for choice, stream in zip(self.choices, self.streams):
            if not stream.finished and choice.finish_reason is None:
                engine.abort(choice.request_id)
                choice.finish_reason = "abort"
                self.state.metrics.requests.labels("abort").inc()

    async def outputs(self) -> AsyncIterator[tuple[Choice, StreamOutput]]:
        """Every choice's outputs as they come, accounted in metrics; raises EngineError."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield self._account(self.choices[0], out), out
            return
        queue: asyncio.Queue[tuple[int, StreamOutput | BaseException]] = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    queue.put_nowait((i, out))
            except EngineError as exc:
                queue.put_nowait((i, exc))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(tasks)
        try:
            while remaining:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield self._account(self.choices[i], item), item
        finally:
            for t in tasks:
                t.cancel()

    def _account(self, choice: Choice, out: StreamOutput) -> Choice:
        m = self.state.metrics
        k = len(out.token_ids)
        if k:
            if choice.first_time is None:
                m.ttft.observe(max(out.time - self.arrival, 0.0))
            else:
                gap = max(out.time - choice.last_time, 0.0) / k
                for _ in range(k):
                    m.itl.observe(gap)
            if choice.first_time is None:
                choice.first_time = out.time
            choice.last_time = out.time
            m.generation_tokens.inc(k)
        choice.text += out.text
        choice.token_ids += out.token_ids
        choice.logprobs += out.logprobs
        if out.finished:
            choice.finish_reason = out.finish_reason
            choice.metrics = out.metrics
            if out.metrics is not None:
                m.observe_finished(out.metrics, out.finish_reason or "abort")
            m.e2e.observe(max(out.time - self.arrival, 0.0))
        return choice

    # ---------------------------------------------------------- response pieces

    def usage(self) -> dict[str, Any]:
        prompt = sum(c.prompt_tokens for i, c in enumerate(self.choices) if i % self.req.n == 0)
        completion = sum(len(c.token_ids) for c in self.choices)
        ms = [c.metrics for c in self.choices if c.metrics is not None]
        fwd = sum(m.forward_passes for m in ms)
        drafted = sum(m.drafted_tokens for m in ms)
        accepted = sum(m.accepted_tokens for m in ms)
        llm = self.state.llm
        spec = {
            "method": llm.spec,
            "num_spec_tokens": llm.num_spec_tokens,
            "forward_passes": fwd,
            "drafted_tokens": drafted,
            "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
            "acceptance_length": sum(m.generated_tokens for m in ms) / fwd if fwd else None,
            "drafted_per_position": _sum_lists([m.drafted_per_position for m in ms]),
            "accepted_per_position": _sum_lists([m.accepted_per_position for m in ms]),
        }
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "speculation": spec,
        }

    def _token(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.state.token_str(token_id)

    def logprobs_json(self, lps: list[TokenLogprob], text_offset: int = 0) -> dict[str, Any] | None:
        if self.kind == "chat":
            content = []
            for lp in lps:
                tok = self._token(lp.token_id)
                content.append(
                    {
                        "token": tok,
                        "logprob": _lp(lp.logprob),
                        "bytes": list(tok.encode("utf-8")),
                        "top_logprobs": [
                            {
                                "token": (t := self._token(i)),
                                "logprob": _lp(v),
                                "bytes": list(t.encode("utf-8")),
                            }
                            for i, v in lp.top
                        ],
                    }
                )
            return {"content": content}
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = text_offset
        for lp in lps:
            tok = self._token(lp.token_id)
            tokens.append(tok)
            token_lps.append(_lp(lp.logprob))
            tops.append({self._token(i): _lp(v) for i, v in lp.top})
            offsets.append(offset)
            offset += len(tok)
        return {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def wants_logprobs(self) -> bool:
        return bool(self.req.logprobs) if self.kind == "chat" else self.req.logprobs is not None

    def final_body(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            lps = self.logprobs_json(c.logprobs) if self.wants_logprobs() else None
            if self.kind == "chat":
                choices.append(
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": lps,
                        "finish_reason": c.finish_reason,
                    }
                )
            else:
                choices.append(
                    {
                        "index": c.index,
                        "text": c.text,
                        "logprobs": lps,
                        "finish_reason": c.finish_reason,
                    }
                )
        return {
            "id": self.id,
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.state.config.model_name,
            "choices": choices,
            "usage": self.usage(),
        }

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.state.config.model_name,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return body

    @property
    def include_usage(self) -> bool:
        opts = self.req.stream_options
        return bool(opts is not None and opts.include_usage)

    def chunk_choice(self, c: Choice, out: StreamOutput) -> dict[str, Any] | None:
        """The chunk choice for one output, or None when it carries nothing to send."""
        lps = None
        if self.wants_logprobs() and out.logprobs:
            lps = self.logprobs_json(out.logprobs, c.lp_chars)
            c.lp_chars += sum(len(self._token(lp.token_id)) for lp in out.logprobs)
        if not out.text and lps is None and not out.finished:
            return None
        reason = c.finish_reason if out.finished else None
        if self.kind == "chat":
            delta = {"content": out.text} if out.text else {}
            return {
                "index": c.index,
                "delta": delta,
                "logprobs": lps,
                "finish_reason": reason,
            }
        return {
            "index": c.index,
            "text": out.text,
            "logprobs": lps,
            "finish_reason": reason,
        }


def _lp(value: float) -> float:
    return value if math.isfinite(value) and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def _sum_lists(lists: list[list[int]]) -> list[int]:
    out: list[int] = []
    for values in lists:
        for i, v in enumerate(values):
            if i == len(out):
                out.append(0)
            out[i] += v
    return out


async def generate(
    state: ServerState,
    request: Request,
    kind: str,
    req: Any,
    prompts: list[list[int]],
    max_tokens: list[int],
    logprobs: int | None,
    arrival: float,
) -> Response:
    if req.stream_options is not None and not req.stream:
        raise APIError(
            400,
            "'stream_options' is only allowed with 'stream': true",
            param="stream_options",
        )
    gen = Generation(state, kind, req, arrival)
    await gen.start(prompts, max_tokens, logprobs)
    if req.stream:
        return WatchedResponse(gen, lambda send: stream_sse(gen, send))
    return WatchedResponse(gen, lambda send: send_complete(gen, send))


class WatchedResponse(Response):
    """Runs `work(send)` while watching for the client's disconnect; aborts what is unfinished
    when the client goes away, the work fails, or the server cancels it."""

    def __init__(self, gen: Generation, work: Callable[[Send], Awaitable[None]]) -> None:
        self.gen = gen
        self.work = work
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.create_task(self.work(send))
        watch = asyncio.create_task(_wait_disconnect(receive))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                exc = work.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
        finally:
            for task in (work, watch):
                task.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)
            self.gen.abort_unfinished()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_complete(gen: Generation, send: Send) -> None:
    try:
        async for _ in gen.outputs():
            pass
        body, status = gen.final_body(), 200
    except EngineError as exc:
        err = APIError(
            503 if isinstance(exc, (EngineDeadError, EngineStoppedError)) else 500,
            _one_line(exc),
        )
        body, status = err.body(), err.status
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def stream_sse(gen: Generation, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ],
        }
    )

    async def emit(obj: Any) -> None:
        await send({"type": "http.response.body", "body": _sse(obj), "more_body": True})

    if gen.kind == "chat":  # the role delta first, one per choice
        for c in gen.choices:
            await emit(
                gen.chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
    try:
        async for c, out in gen.outputs():
            choice = gen.chunk_choice(c, out)
            if choice is not None:
                await emit(gen.chunk([choice]))
        if gen.include_usage:
            await emit(gen.chunk([], gen.usage()))
    except EngineError as exc:
        code = 503 if isinstance(exc, (EngineDeadError, EngineStoppedError)) else 500
        await emit(APIError(code, _one_line(exc)).body())
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


def served_model_name(model_path: str | None) -> str:
    """The default `model` id: the file name without `.gguf`, or the directory's name."""
    if model_path is None:
        from specserve.model.loader import default_model_path

        model_path = default_model_path()
    name = os.path.basename(os.path.normpath(model_path))
    return name.removesuffix(".gguf") or "model"
