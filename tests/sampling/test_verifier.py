"""Tests for specserve.sampling.verifier: greedy rules, losslessness, reproducibility."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from specserve.sampling import SamplingParams, logits_to_probs, make_generator, process
from specserve.sampling import verifier as verifier_mod
from specserve.sampling.verifier import VerifyResult, target_distributions, verify

# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def one_hot_rows(tokens: list[int], v: int) -> torch.Tensor:
    """``[len(tokens), V]`` one-hot rows (what greedy processing yields)."""
    return torch.nn.functional.one_hot(torch.tensor(tokens), v).float()


def cu_of(drafts: list[list[int]]) -> list[int]:
    out = [0]
    for d in drafts:
        out.append(out[-1] + len(d))
    return out


def flat(drafts: list[list[int]]) -> torch.Tensor:
    return torch.tensor([t for d in drafts for t in d], dtype=torch.long)


def chi2_critical(df: int, alpha: float) -> float:
    """Upper ``alpha`` critical value of chi-square(df), Wilson–Hilferty."""
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - alpha)).item()
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def chi2_passes(counts: torch.Tensor, probs: torch.Tensor, alpha: float = 1e-3) -> bool:
    """Goodness of fit of ``counts`` (any shape) to ``probs`` (same shape).

    Observations in zero-probability cells fail outright; cells whose expected
    count is below 5 are pooled into one bin.
    """
    counts = counts.flatten().double()
    probs = probs.flatten().double()
    n = counts.sum()
    if counts[probs <= 0].sum() > 0:
        return False
    expected = n * probs
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (probs > 0)].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = int(keep.sum()) - 1
    assert df >= 3, "test distribution too degenerate"
    return stat < chi2_critical(df, alpha)


# --------------------------------------------------------------------------- #
# Greedy
# --------------------------------------------------------------------------- #


def test_greedy_accepts_prefix_then_argmax() -> None:
    v = 10
    drafts = [[3, 1, 4, 1]]
    probs = one_hot_rows([3, 1, 5, 9, 2], v)  # mismatch at the third draft
    res = verify(probs, flat(drafts), cu_of(drafts), None, [True])
    assert res.emitted == [[3, 1, 5]]
    assert res.num_accepted == [2]
    assert res.num_emitted == [3]


def test_greedy_all_accepted_gives_bonus() -> None:
    v = 10
    drafts = [[3, 1, 4]]
    probs = one_hot_rows([3, 1, 4, 7], v)
    res = verify(probs, flat(drafts), cu_of(drafts), None, [True])
    assert res.emitted == [[3, 1, 4, 7]]
    assert res.num_accepted == [3]


def test_greedy_first_draft_rejected_and_k0() -> None:
    v = 10
    drafts = [[2, 2], []]
    probs = one_hot_rows([5, 2, 2, 8], v)
    res = verify(probs, flat(drafts), cu_of(drafts), None, [True, True])
    assert res.emitted == [[5], [8]]
    assert res.num_accepted == [0, 0]


def test_greedy_uses_argmax_of_non_one_hot_rows() -> None:
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 12), dim=-1)  # [3, 12]
    am = probs.argmax(-1).tolist()
    drafts = [[am[0], (am[1] + 1) % 12]]
    res = verify(probs, flat(drafts), cu_of(drafts), None, [True])
    assert res.emitted == [[am[0], am[1]]]


def test_greedy_fast_path_draws_no_random_numbers() -> None:
    v = 10
    drafts = [[3, 1], [], [4]]
    probs = one_hot_rows([3, 2, 0, 6, 4, 5], v)
    gens = [make_generator(1), make_generator(2), None]
    states = [g.get_state().clone() for g in gens if g is not None]
    default_state = torch.get_rng_state().clone()
    dense = [torch.full((2, v), 0.1), None, torch.full((1, v), 0.1)]
    res = verify(probs, flat(drafts), cu_of(drafts), dense, [True, True, True], gens)
    assert res.emitted == [[3, 2], [6], [4, 5]]
    assert res.num_accepted == [1, 0, 1]
    assert all(torch.equal(s, g.get_state()) for s, g in zip(states, [gens[0], gens[1]]))
    assert torch.equal(default_state, torch.get_rng_state())


def test_ragged_mixed_greedy_and_sampling() -> None:
    """Sampling sequences whose target rows are one-hot behave deterministically."""
    v = 10
    drafts = [[1, 2, 3], [], [4, 5], [6, 7, 8], [], [9]]
    greedy = [True, True, False, False, False, True]
    rows = [
        [1, 2, 0, 3],  # greedy, rejects at the third draft -> [1, 2, 0]
        [7],  # greedy k=0 -> [7]
        [4, 5, 1],  # sampling, all accepted -> bonus 1
        [6, 9, 8, 8],  # sampling, one-hot p rejects 7 -> residual = p -> 9
        [3],  # sampling k=0 -> 3
        [9, 2],  # greedy all accepted -> [9, 2]
    ]
    probs = torch.cat([one_hot_rows(r, v) for r in rows])  # [R, V]
    # sequence 3 has a dense draft distribution, uniform over the vocabulary
    dense = [None, None, None, torch.full((3, v), 1.0 / v), None, None]
    gens = [None, None, make_generator(5), None, make_generator(6), None]
    res = verify(probs, flat(drafts), cu_of(drafts), dense, greedy, gens)
    assert res.emitted == [[1, 2, 0], [7], [4, 5, 1], [6, 9], [3], [9, 2]]
    assert res.num_accepted == [2, 0, 2, 1, 0, 1]


def test_edge_cases_zero_q_and_empty_residual() -> None:
    # q(d) == 0: always rejected although p(d) = 0.5; residual = max(0, p - q) = {0}
    p0 = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [1.0 / 6] * 6])
    q0 = torch.tensor([[0.0, 1.0, 0, 0, 0, 0]])
    # empty residual (a drafter with q >= p everywhere): fall back to p
    p1 = torch.tensor([[0.0, 1.0, 0, 0, 0, 0], [1.0 / 6] * 6])
    q1 = torch.tensor([[0.5, 1.0, 0, 0, 0, 0]])
    drafts = [[0], [0]]
    for seed in range(5):
        res = verify(
            torch.cat([p0, p1]), flat(drafts), cu_of(drafts), [q0, q1], [False, False],
            [make_generator(seed), make_generator(seed + 100)],
        )
        assert res.emitted == [[0], [1]]
        assert res.num_accepted == [0, 0]


def test_random_batches_are_well_formed() -> None:
    """Emitted = accepted draft prefix + a token the right distribution allows."""
    torch.manual_seed(3)
    v, b = 12, 64
    ks = [i % 5 for i in range(b)]
    logits = torch.randn(sum(k + 1 for k in ks), v) * 2
    probs = logits_to_probs(logits, 0.8, top_k=4)  # [R, V] sparse rows
    drafts = [torch.randint(0, v, (k,)).tolist() for k in ks]
    dense = [torch.softmax(torch.randn(k, v), -1) if i % 2 else None for i, k in enumerate(ks)]
    greedy = [i % 7 == 0 for i in range(b)]
    res = verify(probs, flat(drafts), cu_of(drafts), dense, greedy)
    row = 0
    for i, k in enumerate(ks):
        n = res.num_accepted[i]
        assert 0 <= n <= k
        assert res.emitted[i][:n] == drafts[i][:n]
        assert len(res.emitted[i]) == n + 1
        last = res.emitted[i][-1]
        if greedy[i]:
            assert last == int(probs[row + n].argmax())
        else:
            assert float(probs[row + n, last]) > 0
            if n < k and dense[i] is None:
                assert last != drafts[i][n]  # the rejected draft is never recovered
        row += k + 1


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        verify(torch.zeros(3, 4), torch.tensor([1]), [0, 1], None, [True])  # 3 != 2 rows
    with pytest.raises(ValueError):
        verify(torch.zeros(2, 4), torch.tensor([1]), [0, 1], None, [True, False])
    with pytest.raises(ValueError):
        verify(
            torch.full((2, 4), 0.25), torch.tensor([1]), [0, 1], [torch.ones(2, 4)], [False]
        )
    empty = verify(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), [0], None, [])
    assert empty == VerifyResult([], [])


# --------------------------------------------------------------------------- #
# Reproducibility
# --------------------------------------------------------------------------- #


def _sampling_case(seed: int) -> tuple[torch.Tensor, list[list[int]], list[torch.Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    v = 16
    drafts = [torch.randint(0, v, (4,), generator=g).tolist() for _ in range(3)]
    probs = torch.softmax(torch.randn(15, v, generator=g), -1)  # [15, V]
    dense = [torch.softmax(torch.randn(4, v, generator=g), -1), None, None]
    return probs, drafts, dense


def test_seeded_reproducible_and_batch_independent() -> None:
    probs, drafts, dense = _sampling_case(0)

    def run(seeds: list[int]) -> VerifyResult:
        return verify(
            probs, flat(drafts), cu_of(drafts), dense, [False] * 3,
            [make_generator(s) for s in seeds],
        )

    a, b = run([11, 12, 13]), run([11, 12, 13])
    assert a == b
    # different seeds eventually give different outcomes
    assert any(run([s, s + 1, s + 2]) != a for s in range(20, 40))
    # a seeded sequence does not depend on its batch neighbours
    alone = verify(probs[:5], flat(drafts[:1]), [0, 4], dense[:1], [False], [make_generator(11)])
    assert alone.emitted[0] == a.emitted[0]


# --------------------------------------------------------------------------- #
# Losslessness (chi-square)
# --------------------------------------------------------------------------- #

V_STAT = 10
N_STAT = 20_000


def _markov_tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ``P`` and draft ``Q`` tables, ``[V + 1, V]``: row ``t`` is the next-token
    distribution after last token ``t``; row ``V`` the one after the empty prefix."""
    g = torch.Generator().manual_seed(seed)
    p_logits = torch.randn(V_STAT + 1, V_STAT, generator=g)
    p = logits_to_probs(p_logits, 0.7, top_p=0.95)  # [V+1, V], sparse
    q = torch.softmax(torch.randn(V_STAT + 1, V_STAT, generator=g), -1)  # [V+1, V], dense
    return p, q


def _round(
    p: torch.Tensor, q: torch.Tensor, last: torch.Tensor, dense_q: bool, g: torch.Generator
) -> list[list[int]]:
    """One speculative step for ``len(last)`` sequences with ragged k in {1, 2, 3}."""
    n = last.numel()
    ks = torch.arange(n) % 3 + 1  # [N]
    q_cdf = q.double().cumsum(-1)  # [V+1, V]
    chain = [last]
    for _ in range(3):  # d ~ q(. | previous token), by inverse CDF
        u = torch.rand(n, 1, dtype=torch.float64, generator=g)  # [N, 1]
        d = torch.searchsorted(q_cdf[chain[-1]], u * q_cdf[chain[-1], -1:], right=True)
        chain.append(d.squeeze(1).clamp_(max=V_STAT - 1))
    drafts = torch.stack(chain[1:], 1)  # [N, 3]
    prev = torch.stack(chain, 1)  # [N, 4] prefix-last token of each verified row
    row_mask = torch.arange(4)[None, :] <= ks[:, None]  # [N, 4]
    draft_mask = row_mask[:, 1:]  # [N, 3]
    target = p[prev][row_mask]  # [R, V]
    flat_drafts = drafts[draft_mask]  # [T]
    cu = [0] + torch.cumsum(ks, 0).tolist()
    if dense_q:
        q_rows = q[prev[:, :3]][draft_mask]  # [T, V]
        draft_probs = list(torch.split(q_rows, ks.tolist()))
    else:  # drafts drawn at random but declared deterministic: still lossless
        draft_probs = None
    return verify(target, flat_drafts, cu, draft_probs, [False] * n).emitted


def _first_two_tokens(p: torch.Tensor, q: torch.Tensor, dense_q: bool, seed: int) -> torch.Tensor:
    """``[N, 2]``: the first two tokens of N streams (a second step when needed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        first = _round(p, q, torch.full((N_STAT,), V_STAT), dense_q, g)
        short = [i for i, e in enumerate(first) if len(e) == 1]
        x1_short = torch.tensor([first[i][0] for i in short], dtype=torch.long)
        second = _round(p, q, x1_short, dense_q, g)
    out = torch.tensor([e[:2] if len(e) >= 2 else [e[0], -1] for e in first])  # [N, 2]
    out[torch.tensor(short, dtype=torch.long), 1] = torch.tensor(
        [e[0] for e in second], dtype=torch.long
    )
    return out


def _lossless_checks(dense_q: bool, seed: int) -> tuple[bool, bool]:
    """(first token ~ P(.|empty), first two tokens ~ P(x1) P(x2 | x1))."""
    p, q = _markov_tables(seed)
    toks = _first_two_tokens(p, q, dense_q, seed)
    first_counts = torch.bincount(toks[:, 0], minlength=V_STAT)
    ok_first = chi2_passes(first_counts, p[V_STAT])
    joint_counts = torch.bincount(toks[:, 0] * V_STAT + toks[:, 1], minlength=V_STAT**2)
    joint = p[V_STAT][:, None] * p[:V_STAT]  # [V, V]
    ok_joint = chi2_passes(joint_counts, joint)
    return ok_first, ok_joint


@pytest.mark.parametrize("dense_q", [True, False], ids=["draft-model-q", "one-hot-q"])
def test_lossless_chi_square(dense_q: bool) -> None:
    ok_first, ok_joint = _lossless_checks(dense_q, seed=7)
    assert ok_first, "first emitted token does not follow the target distribution"
    assert ok_joint, "first two emitted tokens do not follow the target distribution"


BIASES: dict[str, tuple[str, Callable[..., torch.Tensor]]] = {
    "always-accept": ("_accept", lambda p_d, q_d, u: torch.ones_like(p_d, dtype=torch.bool)),
    "recover-from-p": ("_residual", lambda p, q_dense, d, one_hot: p),
    "accept-any-draft": ("_coupled_accept", lambda x, d: torch.ones_like(d, dtype=torch.bool)),
}


@pytest.mark.parametrize(
    ("bias", "dense_q"),
    [("always-accept", True), ("recover-from-p", True), ("accept-any-draft", False)],
    ids=["always-accept", "recover-from-p-draft-model-q", "accept-any-draft-one-hot-q"],
)
def test_chi_square_detects_biased_verifier(
    monkeypatch: pytest.MonkeyPatch, bias: str, dense_q: bool
) -> None:
    name, fake = BIASES[bias]
    monkeypatch.setattr(verifier_mod, name, fake)
    ok_first, ok_joint = _lossless_checks(dense_q, seed=7)
    assert not (ok_first and ok_joint), f"chi-square missed the {bias} bias"


# --------------------------------------------------------------------------- #
# target_distributions
# --------------------------------------------------------------------------- #


def test_target_distributions_matches_row_by_row_process() -> None:
    torch.manual_seed(21)
    v = 20
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(
            temperature=0.8, top_k=5, repetition_penalty=1.3, presence_penalty=0.5,
            frequency_penalty=0.3,
        ),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, repetition_penalty=1.2),
        SamplingParams(temperature=0.9, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.1, presence_penalty=-0.7),
    ]
    output_ids = [[1, 2], [3, 3, 4], [5], [6, 7], []]
    prompt_ids = [[0, 1], [2, 8, 9], [5, 11], [], [12]]
    drafts = [[2, 9], [4, 4, 3], [5], [], [12, 13, 12]]
    r = sum(len(d) + 1 for d in drafts)
    logits = torch.randn(r, v) * 3  # [R, V]
    out = target_distributions(logits, params, output_ids, prompt_ids, drafts)
    assert out.logits.shape == out.probs.shape == (r, v)
    row = 0
    for i, sp in enumerate(params):
        for j in range(len(drafts[i]) + 1):
            ref = process(
                logits[row : row + 1], sp, [output_ids[i] + drafts[i][:j]], [prompt_ids[i]]
            )
            torch.testing.assert_close(out.logits[row : row + 1], ref.logits)
            torch.testing.assert_close(out.probs[row : row + 1], ref.probs)
            row += 1


def test_target_distributions_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("penalty work without penalties")

    monkeypatch.setattr(verifier_mod, "build_token_counts", boom)
    monkeypatch.setattr(verifier_mod, "build_token_mask", boom)
    torch.manual_seed(22)
    v = 16
    drafts = [[1, 2], [], [3]]
    logits = torch.randn(6, v)  # [R, V]
    greedy_params = [SamplingParams(temperature=0.0)] * 3
    out = target_distributions(logits, greedy_params, [[1]] * 3, [[2]] * 3, drafts)
    assert torch.equal(out.logits, logits)
    assert torch.equal(out.probs, one_hot_rows(logits.argmax(-1).tolist(), v))

    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.8)] * 1
    mixed.append(SamplingParams(temperature=0.0))
    out = target_distributions(logits, mixed, [[1]] * 3, [[2]] * 3, drafts)
    greedy_rows = [0, 1, 2, 4, 5]
    assert torch.equal(
        out.probs[greedy_rows], one_hot_rows(logits[greedy_rows].argmax(-1).tolist(), v)
    )
    ref = process(logits[3:4], mixed[1])
    torch.testing.assert_close(out.probs[3:4], ref.probs)


def test_target_distributions_then_verify_greedy_end_to_end() -> None:
    torch.manual_seed(23)
    v = 16
    logits = torch.randn(4, v)
    am = logits.argmax(-1).tolist()
    drafts = [[am[0], am[1], (am[2] + 1) % v]]
    params = [SamplingParams(temperature=0.0)]
    out = target_distributions(logits, params, [[]], [[]], drafts)
    res = verify(out.probs, flat(drafts), cu_of(drafts), None, [sp.greedy for sp in params])
    assert res.emitted == [[am[0], am[1], am[2]]]
