"""OpenAI request models (pydantic, strict) and the errors the server answers with.

Every field a request may carry is declared here. A field that is not declared is a 400
naming it; a field of the OpenAI API that specserve does not implement (tools, logit_bias,
response_format, ...) is accepted only at its neutral value (null, empty, or the value
that changes nothing) and is otherwise a 400 naming it. Types are strict: `"1"` is not a
number and `1` is not a boolean, as with the OpenAI API.

Extensions beyond the OpenAI API, with vLLM's names and meaning: `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `stop_token_ids`, `return_tokens_as_token_ids`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: Most stop strings per request, most choices per request.
MAX_STOP = 16
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class APIError(Exception):
    """An error answered as OpenAI error JSON: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}

Float = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Model):
    include_usage: bool = False


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _is_neutral_tools(v: Any) -> bool:
    return v is None or v == []


#: OpenAI fields specserve does not implement, and the values that leave them without effect.
NEUTRAL_ONLY: dict[str, tuple[str, Any]] = {
    "logit_bias": ("null or {}", lambda v: v is None or v == {}),
    "tools": ("null or []", _is_neutral_tools),
    "functions": ("null or []", _is_neutral_tools),
    "tool_choice": ('null or "none"', lambda v: v is None or v == "none"),
    "function_call": ('null or "none"', lambda v: v is None or v == "none"),
    "parallel_tool_calls": ("null", lambda v: v is None),
    "response_format": (
        'null or {"type": "text"}',
        lambda v: v is None or v == {"type": "text"},
    ),
    "modalities": ('null or ["text"]', lambda v: v is None or v == ["text"]),
    "audio": ("null", lambda v: v is None),
    "prediction": ("null", lambda v: v is None),
    "reasoning_effort": ("null", lambda v: v is None),
    "web_search_options": ("null", lambda v: v is None),
    "store": ("null or false", lambda v: v is None or v is False),
    "metadata": ("null", lambda v: v is None),
    "service_tier": (
        'null, "auto" or "default"',
        lambda v: v in (None, "auto", "default"),
    ),
    "user": ("null", lambda v: v is None),
    "suffix": ("null", lambda v: v is None),
    "echo": ("false", lambda v: v is None or v is False),
    "best_of": ("null or 1", lambda v: v is None or (type(v) is int and v == 1)),
}
_CHAT_ONLY_NEUTRAL = {
    "suffix",
    "echo",
    "best_of",
}  # completions-only fields, unknown to chat


def check_neutral(body: dict[str, Any], chat: bool) -> None:
    """400 for an OpenAI field specserve does not implement, set to a value with an effect."""
    for name, value in body.items():
        entry = NEUTRAL_ONLY.get(name)
        if entry is None or (chat and name in _CHAT_ONLY_NEUTRAL):
            continue
        allowed, is_neutral = entry
        if not is_neutral(value):
            raise APIError(
                400,
                f"'{name}' is not supported by this server (only {allowed} is accepted)",
                param=name,
            )


class _SamplingFields(_Model):
    model: str
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # extensions (vLLM names)
    top_k: int | None = None
    min_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0.0)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    return_tokens_as_token_ids: bool | None = None
    # OpenAI fields accepted at their neutral value only (see check_neutral)
    logit_bias: Any = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed, got {len(items)}")
        if any(not s for s in items):
            raise ValueError("stop strings must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class CompletionRequest(_SamplingFields):
    prompt: Any
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> str | list[str] | list[list[int]]:
        """A string, a list of strings, a list of token ids, or a list of token id lists."""
        problem = "prompt must be a string, a list of strings, a list of token ids, or a list of token id lists"

        def is_id(x: Any) -> bool:
            return type(x) is int

        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(problem + (" (got an empty list)" if v == [] else ""))
        if len(v) > MAX_PROMPTS and not all(is_id(x) for x in v):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        if all(isinstance(x, str) for x in v):
            return list(v)
        if all(is_id(x) for x in v):
            return [list(v)]
        if all(isinstance(x, list) and x and all(is_id(t) for t in x) for x in v):
            return [list(x) for x in v]
        raise ValueError(problem)


_TYPE_TAGS = {
    "str",
    "int",
    "float",
    "bool",
    "list",
    "dict",
    "none",
    "function-after",
    "function-plain",
}


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (`messages.0.role`)."""
    errors = exc.errors(include_url=False)
    if not errors:
        return APIError(400, "invalid request")
    err = errors[0]
    parts = [str(p) for p in err.get("loc", ()) if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    param = ".".join(parts) or None
    if err.get("type") == "extra_forbidden":
        return APIError(
            400,
            f"unsupported field '{param}': specserve does not implement it",
            param=param,
        )
    if err.get("type") == "missing":
        return APIError(400, f"'{param}' is a required field", param=param)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return APIError(400, f"invalid value for '{param}': {msg}", param=param)
