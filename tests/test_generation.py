"""Plain generation on the real default model: greedy equals transformers, sampling
controls, stops, streaming, batching."""

from __future__ import annotations

import pytest
import torch

from specserve import SamplingParams
from specserve.equivalence import compare_greedy, first_divergence
from tests.conftest import CHAT_PROMPTS


def test_greedy_128_tokens_equal_transformers_generate(llm_fp32, hf_smollm_fp32):
    """fp32, 3 chat prompts, run together as one batch in our engine (transformers decodes
    each alone: 128 steps of its fp32 forward per prompt, most of this test's time)."""
    prompts = [llm_fp32.chat_prompt([{"role": "user", "content": p}]) for p in CHAT_PROMPTS[:3]]
    ours = llm_fp32.generate(prompts, SamplingParams(max_tokens=128))
    for ids, out in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf_smollm_fp32.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=128, eos_token_id=2, pad_token_id=2
            )[0, len(ids) :].tolist()
        assert len(out.token_ids) == 128, "the prompts are chosen so that answers reach the limit"
        i = first_divergence(out.token_ids, ref)
        assert i is None, f"diverges at token {i}: ours {out.token_ids[i:i+5]} vs transformers {ref[i:i+5]}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_equals_alone(dtype, llm_fp32, llm_bf16):
    """Batching changes matmul shapes and so rounding: identical, or a reported near-tie."""
    llm = llm_fp32 if dtype == "float32" else llm_bf16
    prompts = ["The quick brown fox", "In 1969, the first", "def add(a, b):", "Paris is"]
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
    together = llm.generate(prompts, params)
    for p, t in zip(prompts, together):
        alone = llm.generate([p], params)[0]
        d = compare_greedy(alone.token_ids, alone.logprobs, t.token_ids, llm.dtype)
        assert d.ok, f"{p!r}: {d.describe()}"


def test_seed_reproducible_and_independent_of_batch(llm_bf16):
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    a = llm_bf16.generate(["Tell me a story about a dragon."], params)[0]
    b = llm_bf16.generate(["Tell me a story about a dragon.", "Another prompt here"], params)[0]
    assert a.token_ids == b.token_ids
    c = llm_bf16.generate(["Tell me a story about a dragon."], SamplingParams(max_tokens=20, temperature=0.9, seed=99))[0]
    assert c.token_ids != a.token_ids


def test_stream_concatenation_equals_text(llm_bf16):
    messages = [{"role": "user", "content": "Write two sentences about café culture in Paris. 🌍"}]
    params = SamplingParams(max_tokens=48, temperature=0.7, seed=7)
    full = llm_bf16.chat(messages, params)[0]
    deltas = list(llm_bf16.stream(messages, params))
    assert "".join(deltas) == full.text
    assert all("\ufffd" not in d for d in deltas[:-1])


def test_max_tokens_and_eos(llm_bf16):
    out = llm_bf16.generate(["Count: 1, 2, 3,"], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    chat = llm_bf16.chat([{"role": "user", "content": "Say only the word yes."}], SamplingParams(max_tokens=64))[0]
    assert chat.finish_reason == "stop"
    assert chat.token_ids[-1] in llm_bf16.tokenizer.eos_token_ids


def test_stop_string_cuts_text_and_tokens(llm_bf16):
    prompt = "Count: 1, 2, 3,"
    free = llm_bf16.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    assert " 5" in free.text
    out = llm_bf16.generate([prompt], SamplingParams(max_tokens=16, stop=[" 5"], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(" 5")]
    # tokens end with the one that completed the stop string, exactly as plain decoding would
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert " 5" in llm_bf16.tokenizer.decode(out.token_ids)


def test_stop_token_ids(llm_bf16):
    free = llm_bf16.generate(["Count: 1, 2, 3,"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop_id = free.token_ids[3]
    out = llm_bf16.generate(["Count: 1, 2, 3,"], SamplingParams(max_tokens=12, stop_token_ids=[stop_id], ignore_eos=True))[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop"


def test_penalties_change_output(llm_bf16):
    prompt = "Repeat after me: la la la la la la"
    base = llm_bf16.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    pen = llm_bf16.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=1.0))[0]
    assert pen.token_ids != base.token_ids
    assert len(set(pen.token_ids)) > len(set(base.token_ids))


def test_logprobs_reported(llm_bf16):
    out = llm_bf16.generate(["Hello"], SamplingParams(max_tokens=4, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok
        assert len(lp.top) == 3 and lp.top[0][0] == tok  # greedy: the chosen token is the top one
        assert lp.logprob <= 0.0


def test_metrics(llm_bf16):
    out = llm_bf16.generate(["Hello there"], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    m = out.metrics
    assert m.prompt_tokens == len(out.prompt_token_ids)
    assert m.generated_tokens == 8 and m.forward_passes == 8 and m.acceptance_length == 1.0
    assert m.ttft is not None and m.ttft > 0 and m.decode_tokens_per_s > 0


def test_bad_prompts(llm_bf16):
    with pytest.raises(ValueError, match="empty"):
        llm_bf16.generate([[]])
    with pytest.raises(ValueError, match="context limit"):
        llm_bf16.generate([[1] * (llm_bf16.max_model_len + 1)])
    with pytest.raises(ValueError, match="token ids must lie"):
        llm_bf16.generate([[10**9]])
    with pytest.raises(TypeError):
        llm_bf16.generate([3.5])
    with pytest.raises(ValueError, match="dtype"):
        type(llm_bf16)(dtype="float64")
