"""Tests for specserve.sampling: parameters, logits processing, sampling."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from specserve.sampling import (
    SamplingParams,
    SamplingTensors,
    apply_penalties,
    build_token_counts,
    build_token_mask,
    compute_logprobs,
    draft_token_counts,
    logits_to_probs,
    make_generator,
    process,
    process_batch,
    sample,
)
from specserve.sampling import logits as logits_mod

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def hf_probs(
    logits: torch.Tensor,  # [N, V]
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Reference distribution using transformers' warpers in generate() order."""
    dummy_ids = torch.zeros((logits.shape[0], 1), dtype=torch.long)
    scores = logits.clone().float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(dummy_ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(dummy_ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(dummy_ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(dummy_ids, scores)
    return torch.softmax(scores, dim=-1)


def assert_same_distribution(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same surviving token set and the same renormalised probabilities."""
    assert torch.equal(ours > 0, ref > 0), "different surviving token sets"
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.sum(-1), torch.ones(ours.shape[0]), atol=1e-5, rtol=0)


def chi2_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` critical value of chi-square(df), Wilson–Hilferty."""
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - alpha)).item()
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


# --------------------------------------------------------------------------- #
# SamplingParams
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 1.5),
        ("max_tokens", True),
        ("max_tokens", "10"),
        ("temperature", -1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "0.7"),
        ("temperature", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", float("nan")),
        ("top_p", None),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_k", False),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("min_p", float("inf")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("nan")),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.5),
        ("presence_penalty", float("-inf")),
        ("frequency_penalty", 3),
        ("frequency_penalty", "1"),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", 1.0),
        ("seed", True),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", ["ok", 3]),
        ("stop", 5),
        ("stop_token_ids", [1, -1]),
        ("stop_token_ids", [1, "2"]),
        ("stop_token_ids", [True]),
        ("stop_token_ids", 7),
        ("ignore_eos", 1),
        ("ignore_eos", "yes"),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", 2.0),
        ("logprobs", True),
    ],
)
def test_params_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    bad = value if not isinstance(value, list) else None
    if bad is not None and not (isinstance(bad, float) and math.isnan(bad)):
        assert repr(bad) in str(info.value) or str(bad) in str(info.value)


def test_params_message_format() -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1"):
        SamplingParams(temperature=-1)


def test_params_defaults_and_normalization() -> None:
    sp = SamplingParams()
    assert sp.greedy and sp.max_tokens == 128 and sp.stop == () and sp.logprobs is None
    sp = SamplingParams(temperature=1, stop="###", stop_token_ids=[2, 3], top_k=-1, logprobs=20)
    assert sp.temperature == 1.0 and isinstance(sp.temperature, float)
    assert not sp.greedy and not sp.top_k_enabled
    assert sp.stop == ("###",)
    assert sp.stop_token_ids == (2, 3)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(seed=0).seed == 0
    assert hash(sp) == hash(SamplingParams(temperature=1.0, stop=("###",), stop_token_ids=(2, 3),
                                           top_k=-1, logprobs=20))
    with pytest.raises(AttributeError):
        sp.temperature = 0.5  # type: ignore[misc]


# --------------------------------------------------------------------------- #
# Token counts
# --------------------------------------------------------------------------- #


def test_build_token_counts() -> None:
    histories = [[1, 2, 2, 5], [], [0, 0, 0, 9, -1, 10]]  # -1 and 10 are out of range
    counts = build_token_counts(histories, vocab_size=10)
    assert counts.shape == (3, 10)
    for row, hist in zip(counts.tolist(), histories):
        expected = Counter(t for t in hist if 0 <= t < 10)
        assert row == [expected.get(t, 0) for t in range(10)]
    assert build_token_mask(histories, 10).dtype == torch.bool
    assert build_token_counts([], 10).shape == (0, 10)


def test_draft_token_counts() -> None:
    base = build_token_counts([[1, 1], [4]], vocab_size=6)  # [2, 6]
    drafts = torch.tensor([[2, 1, 3], [5, 5, -1]])  # -1 = padding
    out = draft_token_counts(base, drafts)  # [2, 4, 6]
    assert out.shape == (2, 4, 6)
    expected = [
        [[1, 1], [1, 1, 2], [1, 1, 2, 1], [1, 1, 2, 1, 3]],
        [[4], [4, 5], [4, 5, 5], [4, 5, 5]],
    ]
    for b in range(2):
        ref = build_token_counts(expected[b], vocab_size=6)
        assert torch.equal(out[b], ref)


# --------------------------------------------------------------------------- #
# Penalties
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_hf(penalty: float) -> None:
    torch.manual_seed(0)
    v = 50
    logits = torch.randn(3, v) * 2
    prompts = [[1, 2, 3], [7, 7, 8], [10, 11, 12]]
    outputs = [[3, 4], [9, 1], [40, 41]]
    input_ids = torch.tensor([p + o for p, o in zip(prompts, outputs)])
    ref = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    ours = apply_penalties(
        logits,
        build_token_counts(outputs, v),
        build_token_mask(prompts, v),
        repetition_penalty=penalty,
    )
    torch.testing.assert_close(ours, ref)


def test_presence_frequency_hand_computed() -> None:
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0]])
    counts = build_token_counts([[0, 0, 0, 3]], 5)
    prompt_mask = build_token_mask([[2]], 5)  # prompt tokens: no presence/frequency
    out = apply_penalties(
        logits, counts, prompt_mask, presence_penalty=0.5, frequency_penalty=0.25
    )
    expected = torch.tensor([[1.0 - 0.5 - 3 * 0.25, -2.0, 0.5, 3.0 - 0.5 - 0.25, 0.0]])
    torch.testing.assert_close(out, expected)
    assert logits[0, 0] == 1.0  # input untouched


def test_penalties_combined_and_per_row() -> None:
    logits = torch.tensor([[2.0, -1.0, 1.0], [2.0, -1.0, 1.0]])
    counts = build_token_counts([[0, 1, 1], [0, 1, 1]], 3)
    prompt_mask = build_token_mask([[2], [2]], 3)
    out = apply_penalties(
        logits,
        counts,
        prompt_mask,
        repetition_penalty=torch.tensor([2.0, 1.0]),
        presence_penalty=[1.0, 0.0],
        frequency_penalty=torch.tensor([0.5, -0.5]),
    )
    # Row 0: repetition first (2/2, -1*2, 1/2), then frequency and presence.
    row0 = [1.0 - 0.5 - 1.0, -2.0 - 1.0 - 1.0, 0.5]
    # Row 1: no repetition / presence; negative frequency rewards repeats.
    row1 = [2.0 + 0.5, -1.0 + 1.0, 1.0]
    torch.testing.assert_close(out, torch.tensor([row0, row1]))


def test_penalties_broadcast_single_history() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 20)
    counts1 = build_token_counts([[3, 3, 5]], 20)  # [1, V]
    counts4 = counts1.expand(4, -1)
    a = apply_penalties(logits, counts1, None, 1.2, 0.3, 0.1)
    b = apply_penalties(logits, counts4, None, 1.2, 0.3, 0.1)
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- #
# logits -> probs against transformers
# --------------------------------------------------------------------------- #


WARPER_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.3, top_k=40),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.6, top_p=0.5),
    dict(temperature=1.0, top_p=0.01),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=1.5, min_p=0.3),
    dict(temperature=0.9, top_k=20, top_p=0.8),
    dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.05),
    dict(temperature=1.2, top_p=0.7, min_p=0.2),
]


@pytest.mark.parametrize("case", WARPER_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("vocab", [64, 2000])
def test_logits_to_probs_matches_hf(case: dict, vocab: int) -> None:
    torch.manual_seed(vocab)
    logits = torch.randn(4, vocab) * 3
    ours = logits_to_probs(logits, **case)
    ref = hf_probs(logits, **case)
    assert_same_distribution(ours, ref)


def test_top_p_candidate_and_full_sort_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Peaked rows go through the top-1024 prefix; flat ones need a full sort."""
    torch.manual_seed(3)
    v = 4096
    peaked = torch.randn(2, v) * 8  # mass concentrated: prefix path
    flat = torch.randn(2, v) * 0.1  # nearly uniform: full sort path
    calls: list[str] = []
    real_sort = torch.sort

    def counting_sort(*args: object, **kwargs: object) -> object:
        calls.append("sort")
        return real_sort(*args, **kwargs)

    monkeypatch.setattr(logits_mod.torch, "sort", counting_sort)
    for logits, expect_sort in ((peaked, False), (flat, True)):
        calls.clear()
        ours = logits_to_probs(logits, 1.0, top_p=0.9)
        assert bool(calls) == expect_sort
        assert_same_distribution(ours, hf_probs(logits, top_p=0.9))  # HF sorts too


def test_top_p_keeps_ties_at_the_boundary_whatever_the_batch() -> None:
    """Two tokens exactly as likely straddle the nucleus boundary: both are kept, and the
    row's distribution is the same alone (top-1024 prefix) as next to a flat row that
    sends the batch through a full sort, whose order among ties may differ."""
    v = 4096
    probs = torch.full((v,), 1e-6)
    probs[[7, 900, 2500, 3000]] = torch.tensor([0.5, 0.3, 0.1, 0.1])
    tied = torch.log(probs / probs.sum())[None]  # tokens 2500 and 3000 tie exactly
    assert tied[0, 2500] == tied[0, 3000]
    flat = torch.randn(1, v) * 0.01
    alone = logits_to_probs(tied, 1.0, top_p=0.85)
    batched = logits_to_probs(torch.cat([flat, tied, flat]), 1.0, top_p=0.85)
    assert torch.equal(batched[1:2], alone)
    assert sorted(alone[0].nonzero().flatten().tolist()) == [7, 900, 2500, 3000]


def test_top_k_ties_are_kept_like_hf() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    ours = logits_to_probs(logits, 1.0, top_k=2)
    ref = hf_probs(logits, top_k=2)
    assert_same_distribution(ours, ref)
    assert int((ours > 0).sum()) == 4


def test_mixed_batch_rows_match_hf_individually() -> None:
    torch.manual_seed(5)
    v = 300
    cases = [
        dict(temperature=0.0),
        dict(temperature=0.7, top_k=10),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=1.3, min_p=0.2),
        dict(temperature=1.0),
        dict(temperature=0.0, top_k=3, top_p=0.5),
    ]
    params = [SamplingParams(**c) for c in cases]
    st = SamplingTensors.from_params(params)
    logits = torch.randn(len(cases), v) * 2
    probs = process_batch(logits, st).probs
    for i, c in enumerate(cases):
        if c["temperature"] == 0.0:
            expected = torch.zeros(v)
            expected[logits[i].argmax()] = 1.0
            assert torch.equal(probs[i], expected)
        else:
            assert_same_distribution(probs[i : i + 1], hf_probs(logits[i : i + 1], **c))


def test_fast_path_avoids_sorting(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("sort/topk called on the fast path")

    monkeypatch.setattr(logits_mod.torch, "sort", boom)
    monkeypatch.setattr(logits_mod.torch, "topk", boom)
    logits = torch.randn(3, 49152)
    probs = logits_to_probs(logits, [0.0, 0.8, 1.0], top_k=[0, -1, 0], top_p=1.0, min_p=[0, 0.1, 0])
    assert probs.shape == (3, 49152)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_greedy_rows_and_all_greedy() -> None:
    torch.manual_seed(7)
    logits = torch.randn(4, 100)
    probs = logits_to_probs(logits, torch.tensor([0.0, 1.0, 0.0, 0.5]), top_k=5)
    argmax = logits.argmax(-1)
    for i in (0, 2):
        assert probs[i, argmax[i]] == 1.0 and probs[i].sum() == 1.0
    assert int((probs[1] > 0).sum()) == 5
    tokens = sample(probs, [None] * 4)
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]
    all_greedy = logits_to_probs(logits, 0.0, top_p=0.5)
    assert torch.equal(all_greedy.argmax(-1), argmax)
    assert torch.equal(sample(all_greedy), argmax)
    # An explicit greedy mask wins over the distribution.
    flat = torch.full((2, 10), 0.1)
    flat[1, 7] = 0.2
    assert sample(flat, greedy=torch.tensor([True, True])).tolist() == [0, 7]


def test_process_convenience_matches_pipeline() -> None:
    torch.manual_seed(9)
    v = 500
    sp = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05,
                        repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3)
    logits = torch.randn(3, v) * 2
    outputs = [[1, 2, 2], [1, 2, 2, 3], [1, 2, 2, 3, 4]]
    prompts = [[5, 6, 7]]  # shared by all rows
    result = process(logits, sp, outputs, prompts)
    penal = apply_penalties(
        logits, build_token_counts(outputs, v), build_token_mask(prompts, v), 1.2, 0.4, 0.3
    )
    torch.testing.assert_close(result.logits, penal)
    torch.testing.assert_close(result.probs, logits_to_probs(penal, 0.8, 30, 0.9, 0.05))
    # Without penalties, histories are ignored.
    plain = process(logits, SamplingParams(temperature=1.0), outputs, prompts)
    torch.testing.assert_close(plain.probs, torch.softmax(logits, -1))


def test_engine_temperature_only_rows_match_the_pipeline_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's shortcut for rows with a temperature and nothing else gives
    process_batch's exact probabilities, and builds no token counts for them."""
    from specserve.engine import engine as engine_mod

    torch.manual_seed(11)
    v = 49152
    logits = torch.randn(4, v) * 4
    outputs, prompts = [[1, 2, 2], [3], [], [4, 4]], [[5, 6]] * 4
    cases = [
        [SamplingParams(temperature=t) for t in (1.0, 0.7, 1.3, 1e-5)],
        [SamplingParams(temperature=0.9, top_k=v), SamplingParams(temperature=1.0, top_k=-1),
         SamplingParams(temperature=2.0, top_p=1.0), SamplingParams(temperature=0.5, min_p=0.0)],
    ]
    for params in cases:
        assert all(engine_mod._temperature_only(p, v) for p in params)
        expected = process_batch(logits, SamplingTensors.from_params(params))
        with monkeypatch.context() as m:
            m.setattr(engine_mod, "build_token_counts", None)  # not called
            m.setattr(engine_mod, "process_batch", None)  # nor the pipeline
            penalised, probs = engine_mod.processed_logits(logits, params, outputs, prompts)
        assert torch.equal(penalised, expected.logits) and torch.equal(probs, expected.probs)
    # anything else takes the pipeline: a greedy row, top-k, top-p, min-p, a penalty
    for other in (dict(temperature=0.0), dict(temperature=1.0, top_k=5), dict(temperature=1.0, top_p=0.9),
                  dict(temperature=1.0, min_p=0.1), dict(temperature=1.0, presence_penalty=0.5),
                  dict(temperature=1.0, frequency_penalty=0.5), dict(temperature=1.0, repetition_penalty=1.1)):
        assert not engine_mod._temperature_only(SamplingParams(**other), v)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, frequency_penalty=0.5)]
    penalised, probs = engine_mod.processed_logits(logits[:2], params, outputs[:2], prompts[:2])
    expected = process_batch(logits[:2], SamplingTensors.from_params(params), build_token_counts(outputs[:2], v))
    assert torch.equal(probs, expected.probs)


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #


def test_seeded_reproducibility() -> None:
    v = 1000
    probs = torch.full((1, v), 1.0 / v)

    def draw(seed: int, steps: int = 20) -> list[int]:
        gen = make_generator(seed)
        return [int(sample(probs, [gen])[0]) for _ in range(steps)]

    assert draw(1234) == draw(1234)
    assert draw(1234) != draw(4321)
    assert make_generator(None) is None


def test_seeded_row_independent_of_batch() -> None:
    torch.manual_seed(11)
    probs = torch.softmax(torch.randn(3, 200), -1)
    gen_alone, gen_batched, gen_other = make_generator(42), make_generator(42), make_generator(7)
    seq_alone = [int(sample(probs[1:2], [gen_alone])[0]) for _ in range(10)]
    seq_batched = [int(sample(probs, [None, gen_batched, gen_other])[1]) for _ in range(10)]
    assert seq_alone == seq_batched


def test_sample_never_picks_zero_probability() -> None:
    torch.manual_seed(12)
    probs = logits_to_probs(torch.randn(2000, 50), 1.0, top_k=3)
    tokens = sample(probs)
    assert bool((probs.gather(1, tokens[:, None]) > 0).all())


def test_chi2_helper_sane() -> None:
    # Known values: chi2.ppf(0.999, 5) = 20.515, chi2.ppf(0.99, 10) = 23.209
    assert chi2_critical(5, 1e-3) == pytest.approx(20.515, rel=0.02)
    assert chi2_critical(10, 1e-2) == pytest.approx(23.209, rel=0.01)


@pytest.mark.parametrize(
    "case",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05)],
)
def test_sampling_follows_distribution_chi_square(case: dict) -> None:
    v, n = 10, 40_000
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0]])
    probs = logits_to_probs(logits, **case)[0]  # [V]
    with torch.random.fork_rng():
        torch.manual_seed(2024)
        tokens = sample(probs.expand(n, v).contiguous())
    counts = torch.bincount(tokens, minlength=v).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a filtered-out token"
    expected = n * probs[support].double()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    assert df >= 2
    assert stat < chi2_critical(df, alpha=1e-3), f"chi2={stat:.2f} df={df}"


# --------------------------------------------------------------------------- #
# Logprobs
# --------------------------------------------------------------------------- #


def test_top_logprobs_order_ties_as_argmax_does() -> None:
    """Exactly equal logits: the top list runs by ascending token id among them, so a greedy
    token (argmax takes the first maximum) heads it; ties at the k-th place too."""
    v = 4096
    logits = torch.full((2, v), -5.0)
    logits[0, [3000, 17, 2500]] = 4.0  # three-way tie for the top
    logits[0, 900] = 2.0
    logits[1, 40] = 6.0
    logits[1, [3999, 8, 1200]] = 1.0  # tie across the 2nd and 3rd places
    res = compute_logprobs(logits, logits.argmax(-1), k=3)
    assert res.top_token_ids.tolist() == [[17, 2500, 3000], [40, 8, 1200]]
    assert torch.equal(res.top_token_ids[:, 0], logits.argmax(-1))
    ref = torch.log_softmax(logits, -1)
    assert torch.equal(res.top_logprobs, ref.gather(1, res.top_token_ids))


def test_compute_logprobs() -> None:
    torch.manual_seed(13)
    logits = torch.randn(3, 40)
    tokens = torch.tensor([0, 5, 39])
    res = compute_logprobs(logits, tokens, k=4)
    ref = torch.log_softmax(logits, -1)
    torch.testing.assert_close(res.token_logprobs, ref[torch.arange(3), tokens])
    assert res.top_token_ids.shape == (3, 4) and res.top_logprobs.shape == (3, 4)
    torch.testing.assert_close(res.top_logprobs, ref.sort(-1, descending=True).values[:, :4])
    assert torch.equal(res.top_token_ids[:, 0], logits.argmax(-1))
    empty = compute_logprobs(logits, tokens, k=0)
    assert empty.top_token_ids.shape == (3, 0)
    # Computed before truncation: a token cut by top-k still has a finite logprob.
    sp = SamplingParams(temperature=1.0, top_k=1)
    processed = process(logits, sp)
    worst = logits.argmin(-1)
    assert bool(torch.isfinite(compute_logprobs(processed.logits, worst).token_logprobs).all())
    with pytest.raises(ValueError, match="k"):
        compute_logprobs(logits, tokens, k=-1)
