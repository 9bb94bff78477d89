"""Client disconnects free their requests; fuzzed request bodies never give a 500."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL, metric_value

CHAT = [{"role": "user", "content": "Write a long story about a dragon."}]


def wait_idle(server, idle_kv: float, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = server.health()
        if h["running"] == 0 and h["waiting"] == 0 and h["unfinished"] == 0 and h["kv_usage"] <= idle_kv + 1e-9:
            return h
        assert time.monotonic() < deadline, f"server not idle after disconnects: {h}"
        time.sleep(0.2)


def test_50_clients_disconnecting_mid_stream(server):
    idle = wait_idle(server, 1.0)  # idle level before: whatever the KV usage is with nothing running
    aborted_before = metric_value(server.metrics(), "specserve_requests_total", 'finish_reason="abort"')
    body = {
        "model": MODEL,
        "messages": CHAT,
        "max_tokens": 64,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }

    async def one(http: httpx.AsyncClient, i: int) -> int:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = 0
            want = 1 if i % 5 else 3  # every fifth waits for content chunks too
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if events >= want:
                        return events  # leaving the block closes the connection mid-stream
        raise AssertionError("the stream ended before the client left")

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(50)))

    assert len(asyncio.run(main())) == 50
    after = wait_idle(server, idle["kv_usage"])
    assert after["status"] == "ok"
    aborted = metric_value(server.metrics(), "specserve_requests_total", 'finish_reason="abort"') - aborted_before
    assert aborted == 50
    r = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_disconnect_during_non_streamed_request(server):
    idle = wait_idle(server, 1.0)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 64, "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    except httpx.ReadTimeout:
        pass  # the client gave up: the server must abort the request
    wait_idle(server, idle["kv_usage"], timeout=30)


# ---------------------------------------------------------------- fuzzing

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=10,
)
FIELDS = [
    "n", "stop", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "stream", "stream_options",
    "logprobs", "top_logprobs", "max_completion_tokens", "top_k", "min_p", "repetition_penalty", "ignore_eos",
    "stop_token_ids", "logit_bias", "tools", "user", "echo", "suffix", "best_of", "return_tokens_as_token_ids",
]  # fmt: skip
small_int = st.integers(min_value=-3, max_value=4)
plausible = {
    "n": st.one_of(small_int, json_value),
    "temperature": st.one_of(st.floats(min_value=-1, max_value=3), json_value),
    "top_p": st.one_of(st.floats(min_value=-0.5, max_value=1.5), json_value),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), json_value),
    "logprobs": st.one_of(st.booleans(), small_int, json_value),
    "top_logprobs": st.one_of(small_int, json_value),
    "stream": st.one_of(st.booleans(), json_value),
    "stream_options": st.one_of(st.just({"include_usage": True}), json_value),
    "seed": st.one_of(st.integers(min_value=-(2**65), max_value=2**65), json_value),
    "top_k": st.one_of(small_int, json_value),
}


@st.composite
def bodies(draw, chat: bool):
    body: dict = {}
    if draw(st.integers(0, 9)):
        body["model"] = MODEL if draw(st.integers(0, 5)) else draw(json_value)
    if chat:
        if draw(st.integers(0, 9)):
            role = draw(st.sampled_from(["user", "system", "assistant", "developer", "tool", ""]))
            content = draw(
                st.one_of(
                    st.text(max_size=30),
                    json_value,
                    st.just([{"type": "text", "text": "hi"}]),
                )
            )
            body["messages"] = draw(st.one_of(st.just([{"role": role, "content": content}]), json_value))
    elif draw(st.integers(0, 9)):
        body["prompt"] = draw(
            st.one_of(
                st.text(max_size=30),
                st.lists(st.integers(-2, 60000), max_size=5),
                json_value,
            )
        )
    # a short generation when the body is valid
    body["max_tokens"] = (
        draw(st.one_of(st.integers(min_value=-2, max_value=3), json_value)) if draw(st.integers(0, 9)) else 2
    )
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        body[name] = draw(plausible.get(name, json_value))
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(min_size=1, max_size=8))] = draw(json_value)
    return body


def _check_response(r: httpx.Response) -> None:
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    if r.status_code == 400:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        lines = [x for x in r.text.split("\n\n") if x]
        assert lines[-1] == "data: [DONE]"
        for line in lines[:-1]:
            assert "error" not in json.loads(line.removeprefix("data: "))
    else:
        assert r.json()["choices"]


FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(body=bodies(chat=True))
def test_fuzz_chat_bodies(server, body):
    raw = json.dumps(body, allow_nan=True)  # NaN/Infinity too: Python clients can send them
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    _check_response(r)


@FUZZ
@given(body=bodies(chat=False))
def test_fuzz_completion_bodies(server, body):
    raw = json.dumps(body, allow_nan=True)
    r = httpx.post(
        server.url + "/v1/completions",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    _check_response(r)


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=200))
def test_fuzz_raw_bytes(server, raw):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, timeout=30)
    assert r.status_code == 400, r.text[:200]


def test_server_healthy_after_fuzzing(server):
    assert server.health()["status"] == "ok"
    assert (
        metric_value(
            server.metrics(),
            "specserve_http_requests_total",
            'route="/v1/chat/completions",status="500"',
        )
        == 0
    )
    r = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert r.choices[0].message.content is not None
