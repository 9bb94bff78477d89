"""Speculative sampling is lossless, end to end through the engine, for every drafter.

A tiny random-weight model with a 12-token vocabulary generates 4 tokens from a fixed
prompt under many seeds (the first comes from the prefill, the next ones from steps
that verify up to 2 draft tokens). The exact distribution of plain sampling over the
first 3 tokens is enumerated from the model itself; a chi-square goodness-of-fit test checks
the speculative outputs against it. A deliberately biased verifier must fail the same
test, which shows the test can fail.
"""

from __future__ import annotations

import math

import pytest
import torch

from specserve import LLM, SamplingParams
from specserve.engine import engine as engine_module
from specserve.sampling.logits import logits_to_probs
from specserve.sampling.verifier import VerifyResult

transformers = pytest.importorskip("transformers")

VOCAB = 12
PROMPT = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]  # repetitive, so n-gram/suffix drafters propose
SAMPLES = 3000
NEW = 3  # tokens whose joint distribution is checked
MAX_TOKENS = 4


def make_tiny(path, seed: int, layers: int = 4) -> str:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # sharpen the distributions a little so they are not near-uniform
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> str:
    return make_tiny(tmp_path_factory.mktemp("target"), 0)


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory) -> str:
    return make_tiny(tmp_path_factory.mktemp("draft"), 1, layers=2)


def exact_distribution(llm: LLM, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(first NEW tokens) under plain sampling, by enumeration with the model."""
    from specserve.cache import KVCache
    from specserve.engine.runner import ForwardItem, ModelRunner

    cfg = llm.config
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(NEW):
        nxt: dict[tuple[int, ...], float] = {}
        for prefix, p in probs.items():
            cache = KVCache(cfg.num_layers, 1, 64, cfg.num_kv_heads, cfg.head_dim, llm.dtype, llm.device)
            runner = ModelRunner(llm.model, cache)
            logits, _ = runner.forward([ForwardItem(cache.allocate(), 0, PROMPT + list(prefix))])
            logits = logits.float().cpu()
            row = logits_to_probs(
                logits, torch.tensor([params.temperature]), torch.tensor([params.top_k]),
                torch.tensor([params.top_p]), torch.tensor([params.min_p]),
            )[0]
            for t in range(VOCAB):
                if row[t] > 0:
                    nxt[prefix + (t,)] = p * float(row[t])
        probs = nxt
    return probs


def chi_square_rejects(counts: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float], n: int) -> tuple[bool, float, float]:
    """Goodness of fit at alpha = 1e-4 (cells with expected count < 5 pooled)."""
    stat, pooled_obs, pooled_exp, df = 0.0, 0, 0.0, 0
    for key, p in expected.items():
        e = p * n
        o = counts.get(key, 0)
        if e < 5:
            pooled_obs += o
            pooled_exp += e
            continue
        stat += (o - e) ** 2 / e
        df += 1
    unseen = sum(c for k, c in counts.items() if k not in expected)  # impossible outputs
    pooled_obs += unseen
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        df += 1
    elif unseen:
        return True, math.inf, 0.0
    df -= 1
    z = 3.719  # one-sided normal quantile for alpha = 1e-4
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty
    return stat > critical, stat, critical


def run_samples(llm: LLM, params: SamplingParams) -> tuple[dict[tuple[int, ...], int], int]:
    counts: dict[tuple[int, ...], int] = {}
    drafted = 0
    for start in range(0, SAMPLES, 500):
        seqs_params = [
            SamplingParams(
                max_tokens=MAX_TOKENS, temperature=params.temperature, top_p=params.top_p, seed=start + i, ignore_eos=True
            )
            for i in range(500)
        ]
        outs = _generate_many(llm, seqs_params)
        for o in outs:
            key = tuple(o.token_ids[:NEW])
            counts[key] = counts.get(key, 0) + 1
            drafted += o.metrics.drafted_tokens
    return counts, drafted


def _generate_many(llm: LLM, params_list: list[SamplingParams]):
    from specserve.api import RequestOutput

    seqs = [llm.engine.add_request(list(PROMPT), sp) for sp in params_list]
    while not all(s.finished for s in seqs):
        llm.engine.step()
    for s in seqs:
        llm.engine.requests.pop(s.request_id, None)
    return [RequestOutput.from_sequence(s) for s in seqs]


def spec_name(spec: str, draft_path: str) -> str:
    return spec.replace("draft-model", f"draft-model:{draft_path}") if spec.endswith("draft-model") else spec


SPECS = ["ngram", "suffix", "draft-model", "layer-skip:1,2", "ngram+draft-model"]


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (1.0, 1.0)])
@pytest.mark.parametrize("spec", SPECS)
def test_speculative_sampling_matches_plain_distribution(spec, temperature, top_p, tiny_target, tiny_draft):
    llm = LLM(tiny_target, dtype="float32", device="cpu", spec=spec_name(spec, tiny_draft), num_spec_tokens=3,
              adaptive_spec=False, max_num_seqs=64, max_model_len=64)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, top_p=top_p)
    expected = exact_distribution(llm, params)
    counts, drafted = run_samples(llm, params)
    assert drafted > SAMPLES // 2, f"{spec} drafted only {drafted} tokens: the test would not exercise verification"
    if "+" in spec:  # a hybrid: both the copied chains (one-hot q) and the draft model's (its q) were verified
        assert llm.engine.drafter.copied_steps > 0 and llm.engine.drafter.model_steps > 0
    rejects, stat, critical = chi_square_rejects(counts, expected, SAMPLES)
    assert not rejects, f"{spec}: chi-square {stat:.1f} > critical {critical:.1f}"


def test_chi_square_catches_a_biased_verifier(tiny_target, monkeypatch):
    """The same check fails when the verifier accepts every draft (no p/q test)."""
    def accept_all(target_probs, draft_token_ids, cu, draft_probs, greedy, generators, *uniforms):
        emitted, accepted = [], []
        for i in range(len(cu) - 1):
            drafts = draft_token_ids[cu[i] : cu[i + 1]].tolist()
            row = cu[i] + i + len(drafts)  # the last row of sequence i: bonus from the target
            bonus = int(torch.multinomial(target_probs[row], 1, generator=generators[i]))
            emitted.append(drafts + [bonus])
            accepted.append(len(drafts))
        return VerifyResult(emitted, accepted)

    monkeypatch.setattr(engine_module, "verify", accept_all)
    llm = LLM(tiny_target, dtype="float32", device="cpu", spec="ngram", num_spec_tokens=3, adaptive_spec=False,
              max_num_seqs=64, max_model_len=64)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0)
    expected = exact_distribution(llm, params)
    counts, drafted = run_samples(llm, params)
    assert drafted > 0
    rejects, stat, critical = chi_square_rejects(counts, expected, SAMPLES)
    assert rejects, f"biased verifier not detected: chi-square {stat:.1f} <= {critical:.1f}"


@pytest.mark.parametrize("spec", SPECS)
def test_tiny_greedy_equivalence(spec, tiny_target, tiny_draft):
    plain = LLM(tiny_target, dtype="float32", device="cpu", max_model_len=128)
    llm = LLM(tiny_target, dtype="float32", device="cpu", spec=spec_name(spec, tiny_draft), num_spec_tokens=4,
              max_model_len=128)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 17, 30)] + [PROMPT]
    params = SamplingParams(max_tokens=40, ignore_eos=True, logprobs=2)
    ref = plain.generate(prompts, params)
    out = llm.generate(prompts, params)
    from specserve.equivalence import compare_greedy

    for r, o in zip(ref, out):
        d = compare_greedy(r.token_ids, r.logprobs, o.token_ids, torch.float32)
        assert d.ok, f"{spec}: {d.describe()}"
