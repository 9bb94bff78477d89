"""Continuous batching keeps every request's output what it would be alone.

64 Spec-Bench prompts of mixed lengths and `max_tokens` arrive staggered and run at
concurrency 1, 4 and 16, plain and with every drafter (load-aware draft lengths);
concurrency 1 with each drafter runs when SPECSERVE_FULL_BATCH_EQUIVALENCE=1 is set.
Greedy output of every request must equal that request decoded alone with plain
decoding; a divergence is reported with the reference's top-2 logit margin and fails
unless it is a near-tie (on the row-invariant native bf16 layers, any divergence
fails: `bit_exact`). At concurrency 1 and 4 every prompt is read in full; at 16 most
of each prompt comes from the prefix cache. Also: seeded sampling does not depend on the
batch, prefix caching and preemption under a small KV budget leave outputs unchanged.
"""

from __future__ import annotations

import os

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.bench.workload import load_questions
from specserve.engine.engine import Engine
from specserve.equivalence import bit_exact, compare_greedy
from tests.spec.views import run_together

NUM_PROMPTS = 64
MAX_PROMPT = 600
MAX_TOKENS = (4, 12, 20, 8)  # cycled over the requests
FULL_ENV = "SPECSERVE_FULL_BATCH_EQUIVALENCE"


def run_staggered(engine: Engine, requests: list[tuple[list[int], SamplingParams]], concurrency: int):
    """Feed requests so that at most `concurrency` are in flight, one new arrival per step;
    returns the finished sequences in request order."""
    pending = list(enumerate(requests))
    live: dict[int, object] = {}
    done: dict[int, object] = {}
    while pending or live:
        if pending and len(live) < concurrency:
            i, (ids, params) = pending.pop(0)
            live[i] = engine.add_request(ids, params)
        engine.step()
        for i, seq in list(live.items()):
            if seq.finished:
                done[i] = live.pop(i)
                engine.requests.pop(seq.request_id, None)
    return [done[i] for i in range(len(requests))]


@pytest.fixture(scope="module")
def batch_requests(llm_bf16) -> list[tuple[list[int], SamplingParams]]:
    questions = load_questions()
    prompts = []
    for q in questions:
        ids = llm_bf16.chat_prompt([{"role": "user", "content": q.turns[0]}])
        if len(ids) <= MAX_PROMPT:
            prompts.append(ids)
    step = len(prompts) // NUM_PROMPTS  # spread over the categories
    prompts = prompts[::step][:NUM_PROMPTS]
    assert len(prompts) == NUM_PROMPTS
    return [(ids, SamplingParams(max_tokens=MAX_TOKENS[i % len(MAX_TOKENS)], logprobs=2)) for i, ids in enumerate(prompts)]


@pytest.fixture(scope="module")
def alone_reference(llm_bf16, batch_requests):
    """Each request decoded alone with plain greedy decoding."""
    llm_bf16.set_spec(None)
    llm_bf16.reset_prefix_cache()
    return run_staggered(llm_bf16.engine, batch_requests, concurrency=1)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, gguf_path) -> str:
    from specserve.model.export import export_truncated

    return export_truncated(gguf_path, str(tmp_path_factory.mktemp("draft4")), 4)


@pytest.mark.slow
@pytest.mark.parametrize("concurrency", [1, 4, 16])
@pytest.mark.parametrize("spec", [None, "ngram", "suffix", "draft-model", "layer-skip", "ngram+eagle"])
def test_batched_greedy_equals_alone(spec, concurrency, llm_bf16, batch_requests, alone_reference, draft_dir):
    if spec is None and concurrency == 1:
        pytest.skip("this is the reference itself")
    if concurrency == 1 and not os.environ.get(FULL_ENV):
        # one request at a time is single-sequence speculation, which
        # tests/spec/test_spec_equivalence.py covers for every drafter in both dtypes
        pytest.skip(f"concurrency 1 with each drafter runs with {FULL_ENV}=1 (it adds minutes on 2 cores)")
    assert llm_bf16.max_num_seqs >= concurrency
    if concurrency <= 4:
        llm_bf16.reset_prefix_cache()  # every prompt read here, in chunks between the others' decodes
    # at 16 the prompts' leading blocks come from the prefix cache (the runs before left
    # them there): speculation after a cache hit, and the test's time bounded
    llm_bf16.set_spec(f"draft-model:{draft_dir}" if spec == "draft-model" else spec)
    try:
        outputs = run_staggered(llm_bf16.engine, batch_requests, concurrency)
    finally:
        llm_bf16.set_spec(None)
    report, failures = [], []
    for i, (ref, out) in enumerate(zip(alone_reference, outputs)):
        assert out.finish_reason in ("stop", "length")
        d = compare_greedy(ref.output_ids, ref.logprobs, out.output_ids, llm_bf16.dtype)
        if not d.identical:
            report.append(f"request {i}: {d.describe()}")
        if not (d.identical if bit_exact(llm_bf16) else d.ok):
            failures.append(f"request {i}: {d.describe()}")
    drafted = sum(o.metrics.drafted_tokens for o in outputs)
    cached = sum(o.metrics.cached_tokens for o in outputs)
    print(f"spec={spec} concurrency={concurrency}: drafted {drafted}, prompt tokens from the cache {cached}; "
          f"divergences: {report or 'none'}")
    if spec is not None:
        assert drafted > 0, "the drafter never proposed anything"
    assert not failures, "\n".join(failures)


def test_seeded_sampling_does_not_depend_on_the_batch(llm_exact, batch_requests):
    """A seeded request's tokens are the same alone or in a batch of 12, and (with the
    model-free drafters, whose verification draws the target's own token at every
    position) the same with speculation as without."""
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=100 + i) for i in range(4)]
    prompts = [ids for ids, _ in batch_requests[:4]]
    fillers = [(ids, SamplingParams(temperature=0.8, max_tokens=16, seed=7)) for ids, _ in batch_requests[4:12]]
    plain_alone = None
    for spec in (None, "ngram", "suffix"):
        llm_exact.set_spec(spec)
        try:
            alone = [run_staggered(llm_exact.engine, [(p, sp)], 1)[0].output_ids for p, sp in zip(prompts, params)]
            mixed = run_staggered(llm_exact.engine, list(zip(prompts, params)) + fillers, 12)
        finally:
            llm_exact.set_spec(None)
        assert [s.output_ids for s in mixed[:4]] == alone, spec
        plain_alone = plain_alone or alone
        assert alone == plain_alone, spec


def test_prefix_cache_reuses_blocks_and_keeps_outputs(llm_exact):
    system = "You are a careful assistant. " * 60
    convs = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}]
        for q in ("Name a color.", "Name a fruit.", "Name a city.")
    ]
    cache = llm_exact.engine.cache
    llm_exact.reset_prefix_cache()  # the session's model: start from a cold cache
    params = SamplingParams(max_tokens=8)
    first = llm_exact.chat(convs[0], params)[0]
    later = llm_exact.chat(convs[1:], params)
    shared = len(llm_exact.chat_prompt(convs[0])) - 16  # at least this much is a common prefix
    for out in later:
        assert out.metrics.cached_tokens >= shared // cache.block_size * cache.block_size - cache.block_size
    # the same outputs computed without the prefix cache: another engine, emptied per conversation
    fresh = LLM(dtype=str(llm_exact.dtype).removeprefix("torch."), device="cpu", max_num_seqs=2, max_model_len=1024)
    for conv, out in zip(convs, [first, *later]):
        fresh.reset_prefix_cache()
        again = fresh.chat(conv, params)[0]
        assert again.metrics.cached_tokens == 0
        assert again.token_ids == out.token_ids


def test_a_request_done_on_its_first_token_leaves_its_prompt_cached(llm_exact):
    # the prompt's blocks join the prefix cache on the step that ends the request, not after
    prompt = llm_exact.chat_prompt([{"role": "user", "content": "Describe a lighthouse at night. " * 8}])
    block = llm_exact.engine.cache.block_size
    llm_exact.reset_prefix_cache()
    one = llm_exact.generate([prompt], SamplingParams(max_tokens=1))[0]
    assert one.metrics.cached_tokens == 0 and len(one.token_ids) == 1
    again = llm_exact.generate([prompt], SamplingParams(max_tokens=4))[0]
    assert again.metrics.cached_tokens == (len(prompt) - 1) // block * block > 0
    assert again.token_ids[:1] == one.token_ids


def test_small_kv_budget_preempts_and_still_completes(batch_requests):
    # room for two or three of the sequences at once while eight want to run and grow
    llm = LLM(dtype="bfloat16", device="cpu", max_num_seqs=8, max_model_len=768, kv_cache_tokens=768)
    requests = [(ids, SamplingParams(max_tokens=48, ignore_eos=True, logprobs=2)) for ids, _ in batch_requests[:8]]
    reference = run_staggered(llm.engine, requests, 1)
    for spec in (None, "ngram"):
        llm.set_spec(spec)
        outputs = run_staggered(llm.engine, requests, 8)
        assert sum(o.metrics.preemptions for o in outputs) > 0, "the budget never forced a preemption"
        assert llm.engine.cache.usage() == 0.0
        for i, (ref, out) in enumerate(zip(reference, outputs)):
            d = compare_greedy(ref.output_ids, ref.logprobs, out.output_ids, llm.dtype)
            assert d.identical if bit_exact(llm) else d.ok, f"{spec} request {i}: {d.describe()}"


def test_a_newer_sequence_that_outgrows_the_pool_steps_out_for_the_older_one():
    # four blocks of 16 tokens: two sequences of two blocks each are admitted together;
    # the newer one (31 prompt tokens) needs a third block first, while the older one
    # holds the rest and must keep it: the newer one is preempted, not the request lost
    llm = LLM(dtype="float32", device="cpu", max_num_seqs=2, max_model_len=64, kv_cache_tokens=64)
    base = llm.chat_prompt([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
    older, newer = base[:20], base[:31]
    params = SamplingParams(max_tokens=28, ignore_eos=True)
    alone = [llm.generate([ids], params)[0].token_ids for ids in (older, newer)]
    llm.reset_prefix_cache()
    seqs = run_together(llm, [older, newer], [params, params])
    assert [s.output_ids for s in seqs] == alone
    assert seqs[1].metrics.preemptions >= 1 and seqs[0].metrics.preemptions == 0
    assert llm.engine.cache.usage() == 0.0
