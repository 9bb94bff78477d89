"""The CUDA path: every speculative method and the batched engine keep plain decoding's
output on a GPU (skipped where no CUDA device is present; `SPECSERVE_GPU_TESTS_ON=cpu`
runs them on the CPU instead, a dry run of the device checks).

The native kernels are CPU-only, so on CUDA the model runs on PyTorch (cuBLAS, SDPA) and
bf16 results depend on the shapes of a forward: greedy divergences are admitted only as
near-ties, reported with their margin, as the correctness contract says.
"""

from __future__ import annotations

import os

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.equivalence import compare_greedy
from specserve.spec.train import synth_prompts
from tests.engine.test_batching import run_staggered as _run_staggered
from tests.spec import test_spec_sampling as sampling

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("SPECSERVE_GPU_TESTS_ON", "cuda")
MAX_TOKENS = 48
# fp32 on another device: cuBLAS and the CPU sum in different orders (~1e-5 relative on
# the logits), so an fp32 cross-device divergence is a near-tie below this margin
CROSS_DEVICE_FP32 = 0.01


@pytest.fixture(scope="module")
def cuda_bf16() -> LLM:
    return LLM(dtype="bfloat16", device=DEVICE, max_num_seqs=16, max_model_len=2048)


@pytest.fixture(scope="module")
def prompts(cuda_bf16) -> list[list[int]]:
    """16 synthesized chat prompts (no Spec-Bench question, so the check needs no data files)."""
    return [cuda_bf16.chat_prompt([{"role": "user", "content": p}]) for p in synth_prompts(16, seed=5)]


@pytest.fixture(scope="module")
def plain_bf16(cuda_bf16, prompts):
    cuda_bf16.set_spec(None)
    return cuda_bf16.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, logprobs=2))


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> str:
    from specserve.model.export import export_truncated
    from specserve.model.loader import default_model_path

    return export_truncated(default_model_path(), str(tmp_path_factory.mktemp("draft6")), 6)


def run_staggered(engine, requests, concurrency):
    """tests.engine.test_batching.run_staggered, aborting what is left when it fails (so that one
    failure does not leave requests behind for the next test)."""
    try:
        return _run_staggered(engine, requests, concurrency)
    except BaseException:
        for request_id in list(engine.requests):
            engine.abort(request_id)
            engine.requests.pop(request_id, None)
        raise


def divergences(references, candidates, dtype) -> tuple[list[str], list[str]]:
    """(every divergence, those that are not near-ties), described with their margins;
    `references` are (plain greedy tokens, their logprobs) per request."""
    report, failures = [], []
    for i, ((ref_ids, ref_logprobs), out_ids) in enumerate(zip(references, candidates)):
        d = compare_greedy(ref_ids, ref_logprobs, out_ids, dtype)
        if not d.identical:
            report.append(f"request {i}: {d.describe()}")
        if not d.ok:
            failures.append(f"request {i}: {d.describe()}")
    return report, failures


def test_model_and_cache_live_on_the_device(cuda_bf16):
    assert cuda_bf16.device.type == torch.device(DEVICE).type
    assert next(cuda_bf16.model.parameters()).device.type == cuda_bf16.device.type
    if cuda_bf16.device.type == "cuda":
        assert getattr(cuda_bf16.model, "native", None) is None, "the native CPU kernels must stay off on CUDA"


def test_fp32_plain_matches_the_cpu(prompts):
    """Plain greedy fp32 decoding on the device gives the CPU's tokens (near-ties aside)."""
    params = SamplingParams(max_tokens=32, logprobs=2)
    cpu = LLM(dtype="float32", device="cpu", max_num_seqs=8, max_model_len=2048).generate(prompts[:8], params)
    dev = LLM(dtype="float32", device=DEVICE, max_num_seqs=8, max_model_len=2048).generate(prompts[:8], params)
    report = []
    for i, (ref, out) in enumerate(zip(cpu, dev)):
        d = compare_greedy(ref.token_ids, ref.logprobs, out.token_ids, torch.float32)
        if not d.identical:
            report.append((i, d))
    print("fp32 device vs cpu:", [f"prompt {i}: {d.describe()}" for i, d in report] or "identical")
    bad = [f"prompt {i}: {d.describe()}" for i, d in report if d.margin is None or d.margin >= CROSS_DEVICE_FP32]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("spec", ["ngram", "suffix", "draft-model", "layer-skip", "eagle", "medusa"])
def test_speculative_greedy_equals_plain(spec, cuda_bf16, prompts, plain_bf16, draft_dir):
    cuda_bf16.set_spec(f"draft-model:{draft_dir}" if spec == "draft-model" else spec)
    try:
        outputs = cuda_bf16.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, logprobs=2))
    finally:
        cuda_bf16.set_spec(None)
    report, failures = divergences(
        [(r.token_ids, r.logprobs) for r in plain_bf16], [o.token_ids for o in outputs], cuda_bf16.dtype
    )
    drafted = sum(o.metrics.drafted_tokens for o in outputs)
    accepted = sum(o.metrics.accepted_tokens for o in outputs)
    print(f"{spec} on {DEVICE}: drafted {drafted}, accepted {accepted}; divergences: {report or 'none'}")
    assert accepted > 0, f"{spec} never had a draft token accepted"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("spec", [None, "ngram", "eagle"])
def test_staggered_batch_equals_alone(spec, cuda_bf16, prompts):
    """Requests arriving one per step, 8 in flight, with mixed lengths: each one's greedy
    output is what plain decoding gives it alone."""
    requests = [(p, SamplingParams(max_tokens=(8, 24, 40)[i % 3], logprobs=2)) for i, p in enumerate(prompts)]
    cuda_bf16.set_spec(None)
    alone = run_staggered(cuda_bf16.engine, requests, concurrency=1)
    cuda_bf16.set_spec(spec)
    try:
        batched = run_staggered(cuda_bf16.engine, requests, concurrency=8)
    finally:
        cuda_bf16.set_spec(None)
    report, failures = divergences(
        [(r.output_ids, r.logprobs) for r in alone], [o.output_ids for o in batched], cuda_bf16.dtype
    )
    print(f"spec={spec} at concurrency 8 on {DEVICE}: divergences: {report or 'none'}")
    assert not failures, "\n".join(failures)


def test_seeded_sampling_is_reproducible_and_batch_independent(prompts):
    """fp32: a seeded request gives the same tokens alone, again, and inside a batch."""
    llm = LLM(dtype="float32", device=DEVICE, max_num_seqs=12, max_model_len=2048)
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=100 + i) for i in range(4)]
    fillers = [(p, SamplingParams(temperature=0.8, max_tokens=20, seed=7)) for p in prompts[4:12]]
    alone = [run_staggered(llm.engine, [(p, sp)], 1)[0].output_ids for p, sp in zip(prompts, params)]
    again = [run_staggered(llm.engine, [(p, sp)], 1)[0].output_ids for p, sp in zip(prompts, params)]
    mixed = run_staggered(llm.engine, list(zip(prompts, params)) + fillers, 12)
    assert again == alone
    assert [s.output_ids for s in mixed[:4]] == alone


@pytest.mark.parametrize("spec", ["ngram", "draft-model"])
def test_speculative_sampling_matches_plain_distribution(spec, tmp_path_factory):
    """The chi-square test of tests/spec/test_spec_sampling.py, with the tiny models on the device."""
    pytest.importorskip("transformers")
    target = sampling.make_tiny(tmp_path_factory.mktemp("tiny_target"), 0)
    draft = sampling.make_tiny(tmp_path_factory.mktemp("tiny_draft"), 1, layers=2)
    llm = LLM(target, dtype="float32", device=DEVICE, spec=sampling.spec_name(spec, draft), num_spec_tokens=3,
              adaptive_spec=False, max_num_seqs=64, max_model_len=64)
    params = SamplingParams(max_tokens=sampling.MAX_TOKENS, temperature=1.0)
    expected = sampling.exact_distribution(llm, params)
    counts, drafted = sampling.run_samples(llm, params)
    assert drafted > sampling.SAMPLES // 2
    rejects, stat, critical = sampling.chi_square_rejects(counts, expected, sampling.SAMPLES)
    assert not rejects, f"{spec} on {DEVICE}: chi-square {stat:.1f} > critical {critical:.1f}"
