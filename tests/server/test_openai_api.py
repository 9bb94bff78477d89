"""The server through the official `openai` client: chat and completions, streamed and not."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODEL, metric_value

CHAT = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "max_tokens": 12}


def stream_chat(client, **kw):
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kw))
    return chunks


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_non_streamed(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    assert r.object == "chat.completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    spec = r.usage.model_extra["speculation"]
    assert spec["method"] is None and spec["drafted_tokens"] == 0
    assert spec["forward_passes"] == r.usage.completion_tokens and spec["acceptance_length"] == 1.0


def test_chat_streamed_equals_non_streamed(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    chunks = stream_chat(client, messages=CHAT, stream_options={"include_usage": True}, **GREEDY)
    first = chunks[0]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    body, usage = chunks[:-1], chunks[-1]
    assert all(c.usage is None for c in body)
    assert usage.choices == [] and usage.usage.completion_tokens == full.usage.completion_tokens
    assert usage.usage.prompt_tokens == full.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert body[-1].choices[0].finish_reason is not None
    assert len({c.id for c in chunks}) == 1


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = stream_chat(client, messages=CHAT, **GREEDY)
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_completions(client):
    prompt = "The capital of France is"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    assert full.object == "text_completion" and full.choices[0].text
    assert full.usage.completion_tokens <= 8
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_default_max_tokens_and_token_prompts(client):
    r = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 16  # OpenAI's default for /v1/completions
    # a list of prompts: one choice each, in order; token-id prompts too
    r = client.completions.create(model=MODEL, prompt=["One, two,", "A, B,"], temperature=0, max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1]
    single = client.completions.create(model=MODEL, prompt="A, B,", temperature=0, max_tokens=4)
    assert r.choices[1].text == single.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], temperature=0, max_tokens=3)
    assert ids.usage.prompt_tokens == 4


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, n=3, temperature=1.0, seed=7, max_tokens=8)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # distinct samples
    chunks = stream_chat(client, messages=CHAT, n=3, temperature=1.0, seed=7, max_tokens=8)
    texts = {0: "", 1: "", 2: ""}
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    finished = set()
    for c in chunks:
        ch = c.choices[0]
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            assert ch.index not in finished
            finished.add(ch.index)
    assert finished == {0, 1, 2}
    assert texts == {c.index: c.message.content for c in r.choices}


def test_same_seed_streamed_equals_non_streamed(client):
    kw = {
        "messages": [{"role": "user", "content": "Write a haiku about rain."}],
        "temperature": 0.9,
        "top_p": 0.95,
    }
    kw |= {
        "seed": 1234,
        "max_tokens": 16,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
    }
    a = client.chat.completions.create(model=MODEL, **kw)
    b = client.chat.completions.create(model=MODEL, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    text = "".join(c.choices[0].delta.content or "" for c in stream_chat(client, **kw))
    assert text == a.choices[0].message.content


def test_stop_sequences(client):
    free = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24)
    text = free.choices[0].message.content
    words = [w for w in text.split() if len(w) > 3]
    assert words, text
    stop = words[len(words) // 2]
    cut = text[: text.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=24, stop=[stop, "zzzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == cut
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in stream_chat(client, messages=CHAT, temperature=0, max_tokens=24, stop=stop)
    )
    assert streamed == cut


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # greedy picks the most likely token
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content).startswith(r.choices[0].message.content[:5])
    chunks = stream_chat(client, messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY)
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in content]


def test_completion_logprobs_and_token_ids(client):
    r = client.completions.create(
        model=MODEL,
        prompt="1, 2, 3,",
        temperature=0,
        max_tokens=5,
        logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(t.startswith("token_id:") for t in lp.tokens)
    assert all(len(top) == 2 for top in lp.top_logprobs)


def test_greedy_speculation_on_equals_off(client, spec_server):
    spec_client = spec_server.client()
    prompts = [
        "Repeat exactly: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog.",
        "Count from 1 to 20 separated by commas.",
        "Name three colours.",
    ]
    drafted = 0
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        plain = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)
        spec = spec_client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)
        assert spec.choices[0].message.content == plain.choices[0].message.content, p
        stats = spec.usage.model_extra["speculation"]
        assert stats["method"] == "ngram"
        drafted += stats["drafted_tokens"]
        if stats["drafted_tokens"]:
            assert 0 <= stats["accepted_tokens"] <= stats["drafted_tokens"]
            assert stats["acceptance_length"] >= 1.0
            assert sum(stats["drafted_per_position"]) == stats["drafted_tokens"]
            assert sum(stats["accepted_per_position"]) == stats["accepted_tokens"]
        streamed = stream_chat(spec_client, messages=msgs, temperature=0, max_tokens=40)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain.choices[0].message.content
    assert drafted > 0  # the repetitive prompts must have exercised the drafter
    m = spec_server.metrics()
    assert metric_value(m, "specserve_spec_drafted_tokens_total") >= drafted
    assert 'specserve_spec_acceptance_rate{position="0"}' in m


def test_metrics(server, client):
    before = server.metrics()
    client.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    after = server.metrics()
    for name in (
        "specserve_time_to_first_token_seconds_bucket",
        "specserve_inter_token_latency_seconds_bucket",
        "specserve_spec_acceptance_length_bucket",
        "specserve_num_requests_running",
        "specserve_num_requests_waiting",
        "specserve_kv_cache_usage_ratio",
        "specserve_prompt_tokens_total",
    ):
        assert name in after, name
    assert metric_value(after, "specserve_generation_tokens_total") > metric_value(
        before, "specserve_generation_tokens_total"
    )
    assert (
        metric_value(after, "specserve_time_to_first_token_seconds_count")
        == metric_value(before, "specserve_time_to_first_token_seconds_count") + 1
    )
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
