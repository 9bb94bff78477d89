"""Errors as OpenAI error JSON: 400 naming the field, 401, 404, 413, 429, context overflow."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, MODEL

CHAT = [{"role": "user", "content": "Hi"}]


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"foo": 1}, "foo"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"seed": -5}, "seed"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages.0.name",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                    }
                ]
            },
            "messages.0.content",
        ),
        ({"messages": []}, "messages"),
        ({"max_tokens": 65}, "max_tokens"),  # over this server's --max-tokens-limit 64
    ],
)
def test_invalid_chat_fields_are_400_naming_the_field(client, extra, param):
    kwargs = {"model": MODEL, "messages": CHAT, "max_tokens": 4}
    body_extra = {}
    for key, value in extra.items():
        if key in ("messages", "max_tokens"):
            kwargs[key] = value
        else:
            body_extra[key] = value
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs, extra_body=body_extra)
    err = error_of(info.value)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert param.split(".")[0] in err["message"] or param in err["message"], err


def test_neutral_values_of_unsupported_fields_are_accepted(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=2,
        extra_body={
            "logit_bias": None,
            "tools": [],
            "response_format": {"type": "text"},
        },
    )
    assert r.choices[0].message.content is not None


def test_unknown_model_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=2)
    err = error_of(info.value)
    assert err["param"] == "model" and err["code"] == "model_not_found"


def test_completions_prompt_errors(client):
    for prompt in ([], [[]], [1, "a"], [-1], [10**9], {"a": 1}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
        assert error_of(info.value)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, echo=True)
    assert error_of(info.value)["param"] == "echo"


def test_context_overflow(client, server):
    long = "word " * 700  # > 512 tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=4)
    assert error_of(info.value)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * 480, max_tokens=60)
    err = error_of(info.value)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert server.health()["status"] == "ok"


def test_404_405_and_bad_json(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    for raw in (b"{", b"[]", b'"x"', b"\xff\xfe", b"", b"[" * 100000 + b"]" * 100000):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert r.status_code in (400, 413), raw[:10]
        assert "error" in r.json()


def test_api_key(spec_server):
    with pytest.raises(openai.AuthenticationError) as info:
        spec_server.client(api_key="wrong").models.list()
    assert error_of(info.value)["code"] == "invalid_api_key"
    r = httpx.post(
        spec_server.url + "/v1/chat/completions",
        json={"model": MODEL, "messages": CHAT},
    )
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert spec_server.client(api_key=API_KEY).models.list().data[0].id == MODEL
    assert httpx.get(spec_server.url + "/health").status_code == 200  # health and metrics stay open


def test_request_size_limit(tiny_server):
    big = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x" * 5000}],
        "max_tokens": 2,
    }
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"

    def chunked():
        yield json.dumps(big).encode()

    r = httpx.post(tiny_server.url + "/v1/chat/completions", content=chunked())  # no Content-Length
    assert r.status_code == 413


def test_queue_full_is_429(tiny_server):
    """Capacity 2 (1 running + 1 waiting): a third concurrent request is refused, then served."""
    # ~450 decode steps each: neither can finish before the third request arrives
    long = {"model": MODEL, "messages": CHAT, "max_tokens": 450, "stream": True, "ignore_eos": True}
    http = httpx.Client(base_url=tiny_server.url, timeout=60)
    url = "/v1/chat/completions"
    with http, http.stream("POST", url, json=long) as a, http.stream("POST", url, json=long) as b:
        assert a.status_code == 200 and b.status_code == 200
        # both admitted (role chunks sent); the line iterators are kept alive: a dropped one
        # is closed at once, and closing it closes the connection (the server aborts the stream)
        lines = [a.iter_lines(), b.iter_lines()]
        assert all(next(it).startswith("data: ") for it in lines)
        with pytest.raises(openai.RateLimitError) as info:
            tiny_server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        err = error_of(info.value)
        assert err["code"] == "queue_full" and info.value.response.headers["retry-after"]
    # leaving the `with` closed both streams: the server aborts them and frees their places
    deadline = time.monotonic() + 30
    while tiny_server.health()["unfinished"]:
        assert time.monotonic() < deadline, tiny_server.health()
        time.sleep(0.1)
    r = tiny_server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0)
    assert r.choices[0].message.content is not None
    assert "specserve_requests_rejected_total 1.0" in tiny_server.metrics()


def test_more_sequences_than_the_server_takes_is_400(tiny_server):
    with pytest.raises(openai.BadRequestError) as info:
        tiny_server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, n=3)
    err = error_of(info.value)
    assert err["param"] == "n" and "at most 2" in err["message"]
