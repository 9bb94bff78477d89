"""Greedy speculative decoding equals plain greedy decoding, for every drafter, on 52
Spec-Bench prompts (4 per category, up to 800 prompt tokens) with the default model in bf16,
and on every 4th of them (about one per category) in fp32.

Divergences are reported with the plain run's top-2 logit margin at that position; one
that is not a near-tie fails, and where outputs are bit-exact (fp32, or bf16 on the
native layers) any divergence fails.
"""

from __future__ import annotations

import pytest
import torch

from specserve import SamplingParams
from specserve.bench.workload import load_questions
from specserve.equivalence import NEAR_TIE, bit_exact, compare_greedy, first_divergence
from specserve.model.export import export_truncated

MAX_TOKENS = 32
PER_CATEGORY = 4
MAX_PROMPT = 800


@pytest.fixture(scope="session")
def draft_model_dir(tmp_path_factory, gguf_path) -> str:
    """A draft model derived from the target: its first 6 layers + norm + head."""
    return export_truncated(gguf_path, str(tmp_path_factory.mktemp("draft6")), 6)


@pytest.fixture(scope="session")
def bench_prompts(llm_bf16) -> list[list[int]]:
    """The first PER_CATEGORY questions of every category whose prompt fits MAX_PROMPT tokens
    (every method re-prefills every prompt: long ones would dominate the test's time)."""
    prompts: list[list[int]] = []
    questions = load_questions()
    for category in dict.fromkeys(q.category for q in questions):
        picked = 0
        for q in (q for q in questions if q.category == category):
            ids = llm_bf16.chat_prompt([{"role": "user", "content": q.turns[0]}])
            if len(ids) <= MAX_PROMPT and picked < PER_CATEGORY:
                prompts.append(ids)
                picked += 1
    assert len(prompts) >= 50
    return prompts


_references: dict[str, list] = {}


def plain_reference(llm, prompts):
    key = str(llm.dtype)
    if key not in _references:
        llm.set_spec(None)
        _references[key] = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, logprobs=2))
    return _references[key]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("spec", ["ngram", "suffix", "draft-model", "layer-skip", "ngram+eagle"])
def test_greedy_equivalence_spec_bench(spec, dtype, llm_bf16, llm_fp32, bench_prompts, draft_model_dir):
    if spec == "ngram+eagle" and dtype == "float32":
        pytest.skip("the hybrid's parts run in fp32 here and in tests/spec/test_hybrid.py; bf16 is the served dtype")
    llm = llm_bf16 if dtype == "bfloat16" else llm_fp32
    # fp32 runs on the PyTorch path, 4x slower than the native bf16 layers on a CPU without
    # AMX: every 4th prompt there (bf16, bit-exact where native, takes all)
    prompts = bench_prompts if dtype == "bfloat16" else bench_prompts[::PER_CATEGORY]
    reference = plain_reference(llm, prompts)
    llm.set_spec(f"draft-model:{draft_model_dir}" if spec == "draft-model" else spec)
    try:
        outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, logprobs=2))
    finally:
        llm.set_spec(None)
    report, failures, drafted, accepted = [], [], 0, 0
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        drafted += out.metrics.drafted_tokens
        accepted += out.metrics.accepted_tokens
        d = compare_greedy(ref.token_ids, ref.logprobs, out.token_ids, llm.dtype)
        if not d.identical:
            report.append(f"prompt {i}: {d.describe()}")
        if not (d.identical if bit_exact(llm) else d.ok):
            failures.append(f"prompt {i}: {d.describe()}")
    print(f"{spec} {dtype}: drafted {drafted}, accepted {accepted}; divergences: {report or 'none'}")
    assert drafted > 0, "the drafter never proposed anything"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("spec", ["ngram", "eagle"])
def test_greedy_speculative_logprobs_are_plain_decodings(spec, llm_bf16, bench_prompts):
    """Logprobs of speculative tokens (a chain's rows, a tree's accepted path) are the ones
    plain decoding reports for the same tokens: on the row-invariant native layers the
    same values, elsewhere equal within rounding."""
    prompts = bench_prompts[:6]
    params = SamplingParams(max_tokens=24, logprobs=3)
    llm_bf16.set_spec(None)
    plain = llm_bf16.generate(prompts, params)
    llm_bf16.set_spec(spec, adaptive=False)  # a fixed draft length: six sequences at once may make
    try:  # the load-aware plan draft nothing on a CPU where drafted rows are dear
        spec_out = llm_bf16.generate(prompts, params)
    finally:
        llm_bf16.set_spec(None)
    assert sum(o.metrics.accepted_tokens for o in spec_out) > 0
    exact = bit_exact(llm_bf16)
    tol = 0.0 if exact else NEAR_TIE[torch.bfloat16]  # bf16 logits may round a few steps apart
    for p, o in zip(plain, spec_out):
        n = first_divergence(p.token_ids, o.token_ids)
        n = len(p.token_ids) if n is None else n
        assert len(o.logprobs) == len(o.token_ids)
        for a, b in zip(p.logprobs[:n], o.logprobs[:n]):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= tol
            assert [t for t, _ in a.top] == [t for t, _ in b.top] or not exact
            assert all(abs(x - y) <= tol for (_, x), (_, y) in zip(a.top, b.top))
