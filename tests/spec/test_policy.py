"""Load-aware draft lengths: the batch-shape cost table and the plan built on it."""

import random

import numpy as np
import pytest

from specserve.spec.policy import AdaptiveSpecPolicy, CatchUpTime, DraftTime, ForwardCost, StepOverhead, _solve


def linear_cost(seqs=(1, 2, 4, 8, 16), tokens=(1, 2, 3, 5, 9), base=0.02, per_seq=0.002, per_row=0.0):
    """A cost table with a fixed part, a per-sequence part and a per-row part."""
    return ForwardCost(
        seqs, tokens, tuple(tuple(base + per_seq * s + per_row * s * t for t in tokens) for s in seqs)
    )


def test_forward_cost_interpolates_and_extrapolates():
    cost = linear_cost(per_row=0.001)
    exact = lambda s, n: 0.02 + 0.002 * s + 0.001 * n
    for s, n in [(1, 1), (4, 12), (16, 144), (3, 3), (3, 7), (12, 30), (1, 4)]:
        assert cost(s, n) == pytest.approx(exact(s, n))
    assert cost(1, 40) == pytest.approx(exact(1, 40))  # past the last token count: the last slope
    assert cost(32, 32) == pytest.approx(2 * cost(16, 16))  # past the last sequence count: proportional
    assert cost(4, 2) == pytest.approx(cost(4, 4))  # fewer tokens than sequences: one row each


def test_a_measured_first_extra_row_prices_the_first_draft():
    """With `one_more`, the first row past S costs what was measured, the next ones share the
    rest up to 2S rows; the plan weighs a lone draft at its own price."""
    seqs, tokens = (1, 2, 4), (1, 2, 3)
    table = tuple(tuple(0.02 + 0.002 * s * t for t in tokens) for s in seqs)  # 2 ms a row
    dear = ForwardCost(seqs, tokens, table, one_more=(0.024, 0.026, 0.034))  # 6 ms for the 5th row
    plain = ForwardCost(seqs, tokens, table)
    assert plain(4, 5) == pytest.approx(plain(4, 4) + 0.002)
    assert dear(4, 5) == pytest.approx(0.034)
    assert dear(4, 8) == pytest.approx(plain(4, 8))  # on the grid, unchanged
    assert dear(4, 6) == pytest.approx(0.034 + (0.036 - 0.034) / 3)  # the rest of the way to 8 rows
    assert dear(1, 2) == pytest.approx(plain(1, 2))  # one sequence: the knot is a grid point
    assert dear(2, 3) == pytest.approx(0.026)
    assert dear.many(4, np.array([4, 5, 6, 8])).tolist() == pytest.approx([dear(4, n) for n in (4, 5, 6, 8)])
    # a measured time outside its neighbours' is clamped between them (the cost stays monotone)
    assert ForwardCost(seqs, tokens, table, one_more=(0.0, 0.0, 0.5))(4, 5) == pytest.approx(plain(4, 8))
    with pytest.raises(ValueError, match="one_more"):
        ForwardCost(seqs, tokens, table, one_more=(0.03,))
    # a lone draft accepted 60% of the time pays for a 2 ms row in a 28 ms step of 4, not a 6 ms
    # one; four of them pay either way (8 rows are on the grid)
    lone = [0.6, 0.0, 0.0, 0.0]
    assert AdaptiveSpecPolicy(1, plain).plan(lone, 4) == [1, 0, 0, 0]
    assert AdaptiveSpecPolicy(1, dear).plan(lone, 4) == [0, 0, 0, 0]
    assert AdaptiveSpecPolicy(1, dear).plan([0.6] * 4, 4) == [1, 1, 1, 1]


def test_forward_cost_rejects_bad_grids():
    with pytest.raises(ValueError):
        ForwardCost((2,), (1,), ((0.1,),))
    with pytest.raises(ValueError):
        ForwardCost((1, 1), (1,), ((0.1,), (0.1,)))
    with pytest.raises(ValueError):
        ForwardCost((1,), (1, 2), ((0.1,),))
    with pytest.raises(TypeError):
        AdaptiveSpecPolicy(4, [0.1, 0.2])


def test_flat_forward_drafts_the_most_and_steep_forward_drafts_nothing():
    flat = AdaptiveSpecPolicy(8, ForwardCost.flat(0.025))
    assert flat.plan([0.6] * 4, 4) == [8] * 4
    steep = AdaptiveSpecPolicy(8, linear_cost(base=0.0, per_seq=0.0, per_row=0.01))  # every row costs the same
    assert steep.plan([0.6] * 4, 4) == [0] * 4


def test_drafts_shrink_as_the_batch_grows():
    # cheap extra rows for one sequence, dearer ones per sequence as the batch fills the machine
    seqs, tokens = (1, 2, 4, 8, 16), (1, 2, 3, 5, 9)
    table = tuple(tuple(0.025 + 0.0005 * s * (t - 1) * s for t in tokens) for s in seqs)
    policy = AdaptiveSpecPolicy(8, ForwardCost(seqs, tokens, table))
    per_seq = [sum(policy.plan([0.6] * s, s)) / s for s in seqs]
    assert per_seq[0] >= 3
    assert per_seq == sorted(per_seq, reverse=True)
    assert per_seq[-1] < 1


def test_better_acceptance_gets_more_drafts():
    policy = AdaptiveSpecPolicy(8, linear_cost(per_row=0.0004))
    ks = policy.plan([0.9, 0.5, 0.1, 0.7], 4)
    assert ks[0] >= ks[3] >= ks[1] >= ks[2]
    assert ks[0] > ks[2]


def test_step_times_teach_the_scale_and_drafting_costs_count():
    cost = linear_cost(per_row=0.001)
    policy = AdaptiveSpecPolicy(8, cost)
    for _ in range(50):
        policy.observe_draft_time(0.001, 10)
        policy.observe_step(4, 8, 2 * cost(4, 8) + 0.001)
    assert policy.scale == pytest.approx(2.0, rel=0.01)
    assert policy.draft_cost == pytest.approx(1e-4)
    # dear drafting makes the plan smaller
    cheap = sum(policy.plan([0.7] * 4, 4))
    policy.draft_cost = 0.05
    assert sum(policy.plan([0.7] * 4, 4)) < cheap


def test_a_drafters_catch_up_is_not_a_cost_per_draft():
    """An EAGLE head's first call for a request runs its layer over the whole prompt: that
    time grows with the prompt, not with the drafts, and stays out of the cost per draft
    token (and, like all drafting time, out of the step overhead's fit)."""
    cost = linear_cost(per_row=0.001)
    policy = AdaptiveSpecPolicy(8, cost)
    policy.observe_draft_time(0.052, 2, catch_up=0.050)
    assert policy.draft_cost == pytest.approx(0.001)
    policy.observe_step(1, 3, 0.052 + cost(1, 3), forward_seconds=cost(1, 3), drafted=2, decoding=1)
    assert policy.overhead(1, 2) == pytest.approx(0.0, abs=1e-9)


def test_a_drafters_backlog_is_priced_per_sequence():
    """Catch-up calls fit as a fixed part per call plus a part per row. A sequence whose
    backlog would cost more than its drafts can gain is left undrafted whatever its place in
    the batch, the others are drafted as they would be alone, a drafter that keeps no backlog
    (pending None), or sequences whose drafts would not run its model (a hybrid's copies, None
    each), are planned as before, and the charge stops growing at what probing on schedule
    leaves (probe_every steps of 1 + max_k rows)."""
    fit = CatchUpTime()
    for rows in (2, 3, 40, 2, 120, 8) * 3:
        fit.observe(rows, 0.0005 + 0.00002 * rows)
    assert fit.coef[0] == pytest.approx(0.0005, rel=0.05) and fit.coef[1] == pytest.approx(0.00002, rel=0.05)

    def policy_with_history() -> AdaptiveSpecPolicy:
        policy = AdaptiveSpecPolicy(4, linear_cost(per_row=0.001))
        for _ in range(6):
            for rid in "abc":
                policy.update(rid, 4, 2)
            policy.observe_draft_time(0.0035 + 0.050, 4, catch_up=0.0005 + 0.001 * 50, catch_up_rows=50)
            policy.observe_draft_time(0.0031 + 0.002, 4, catch_up=0.0005 + 0.001 * 2, catch_up_rows=2)
        return policy

    policy = policy_with_history()
    assert policy.catch_up.coef[1] == pytest.approx(0.001, rel=0.05)  # 1 ms a row
    free = policy.budgets(["a", "b", "c"], 3)
    assert all(k > 0 for k in free)  # no backlog known: all drafted
    assert policy_with_history().budgets(["a", "b", "c"], 3, pending=[None] * 3) == free  # copies: no catch-up
    alone = policy_with_history().budgets(["a", "c"], 2, pending=[0, 0])
    for order in ([0, 1, 2], [1, 0, 2], [2, 1, 0]):
        ids = [["a", "b", "c"][i] for i in order]
        pending = [40 if rid == "b" else 0 for rid in ids]  # b: 40 ms of catch-up
        plan = dict(zip(ids, policy_with_history().budgets(ids, 3, pending=pending)))
        assert plan["b"] == 0 and [plan["a"], plan["c"]] == alone, order
    capped = policy.probe_every * (1 + policy.max_k)
    assert policy_with_history().budgets(["a", "b"], 2, pending=[0, 5000]) == policy_with_history().budgets(
        ["a", "b"], 2, pending=[0, capped]
    )


def test_prefill_chunks_in_a_step_do_not_make_drafts_look_free():
    """Four sequences decode while a 500-token prompt prefills: the step is slow whatever is
    drafted, so drafts are weighed against a step of the four decoding alone, where a row
    costing a sixth of the step needs an acceptance above what 0.6 gives."""
    cost = linear_cost(base=0.02, per_seq=0.0, per_row=0.01)
    policy = AdaptiveSpecPolicy(8, cost)
    assert policy.plan([0.6] * 4, 4) == [0] * 4
    assert policy.plan([0.6] * 4, 4 + 500) == [0] * 4
    assert sum(policy.plan([0.99] * 4, 4 + 500)) > 0  # near-certain drafts still pay


def test_probes_are_skipped_where_no_acceptance_could_make_drafting_pay():
    # a drafted row costs 45% of the step of two sequences: not even an acceptance of 0.9 pays for it
    steep = AdaptiveSpecPolicy(4, linear_cost(base=0.02, per_seq=0.0, per_row=0.1), probe_every=2)
    cheap = AdaptiveSpecPolicy(4, linear_cost(per_row=0.0005), probe_every=2)
    for policy in (steep, cheap):
        for _ in range(30):
            policy.update("a", 4, 0)
    assert all(sum(steep.budgets(["a", "b"], 2)) == 0 for _ in range(8))
    assert any(sum(cheap.budgets(["a", "b"], 2)) > 0 for _ in range(8))


def test_step_overhead_is_learned_apart_from_the_forward():
    """Steps whose time outside the forward is fixed + per sequence + per draft token: the
    policy learns the three parts and a forward scale of 1."""
    cost = linear_cost(per_row=0.001)
    policy = AdaptiveSpecPolicy(8, cost)
    rng = random.Random(0)
    for _ in range(300):
        seqs = rng.choice([1, 2, 4, 8, 16])
        drafted = rng.randint(0, 3 * seqs)
        forward = cost(seqs, seqs + drafted)
        policy.observe_draft_time(0.0, 0)
        seconds = forward + 0.002 + 0.0005 * seqs + 0.0001 * drafted
        policy.observe_step(seqs, seqs + drafted, seconds, forward_seconds=forward, drafted=drafted, decoding=seqs)
    assert policy.scale == pytest.approx(1.0)
    assert policy.overhead.coef == pytest.approx([0.002, 0.0005, 0.0001], rel=0.02)
    # steps with prefill chunks (fewer decoding sequences than sequences) teach the scale only
    before = policy.overhead.coef.copy()
    policy.observe_step(4, 300, 0.5, forward_seconds=cost(4, 300), drafted=0, decoding=2)
    assert (policy.overhead.coef == before).all()


def test_a_fixed_overhead_at_a_fixed_draft_length_is_not_charged_to_drafts():
    """One sequence always drafting 8 tokens, 2 ms outside the forward per step: the fixed
    part takes it, so dropping drafts does not look like a saving."""
    cost = linear_cost(per_row=0.001)
    policy = AdaptiveSpecPolicy(8, cost)
    for _ in range(100):
        policy.observe_step(1, 9, cost(1, 9) + 0.002, forward_seconds=cost(1, 9), drafted=8, decoding=1)
    c0, c1, c2 = policy.overhead.coef
    assert c0 + c1 == pytest.approx(0.002, rel=0.05)
    assert c2 < 2e-5


def test_a_negative_trend_drops_its_coefficient():
    """Time outside the forward that falls as the batch grows cannot be a negative cost per
    sequence: that coefficient is dropped and the fixed part fits the mean."""
    policy = AdaptiveSpecPolicy(8, ForwardCost.flat(0.01))
    overheads = {s: 0.004 - 0.0002 * s for s in (1, 2, 4, 8, 16)}
    for seqs in (1, 2, 4, 8, 16) * 20:
        policy.observe_step(seqs, seqs, 0.01 + overheads[seqs], forward_seconds=0.01, drafted=0, decoding=seqs)
    assert policy.overhead.coef[1] == 0.0
    assert policy.overhead(1, 0) == pytest.approx(sum(overheads.values()) / 5, rel=0.1)


def test_small_solves_match_lstsq_singular_or_not():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3):
        for _ in range(50):
            x = rng.normal(size=(8, n))
            a, b = x.T @ x, x.T @ rng.normal(size=8)
            expected = np.linalg.lstsq(a, b, rcond=None)[0]
            assert _solve(a.tolist(), b.tolist()) == pytest.approx(expected.tolist(), rel=1e-9, abs=1e-12)
    # rank 1 (every call drafted the same count): lstsq's minimum-norm solution
    a, b = [[4.0, 8.0], [8.0, 16.0]], [2.0, 4.0]
    assert _solve(a, b) == pytest.approx(np.linalg.lstsq(np.array(a), np.array(b), rcond=None)[0].tolist())
    assert _solve([[0.0]], [0.0]) == [0.0]


def test_the_fits_match_a_least_squares_reference():
    """The fits solve their normal equations in plain floats: the same predictions as
    numpy's lstsq on the same equations (the fit the policy had before), including one
    sequence throughout (the sequence count's column equals the fixed one) and a
    coefficient dropped for coming out negative. (Coefficients themselves may differ where
    one sits at zero: a rounding-level negative is dropped, a positive kept.)"""

    def reference(fit) -> np.ndarray:
        active = list(range(len(fit.coef)))
        while active:
            g = fit.gram[np.ix_(active, active)]
            penalty = np.diag([fit.ridge * max(np.trace(g), 1.0) if fit.shrink[j] else 0.0 for j in active])
            sol = np.linalg.lstsq(g + penalty, fit.moment[active], rcond=None)[0]
            if (sol >= 0).all():
                coef = np.zeros(len(fit.coef))
                coef[active] = sol
                return coef
            active.pop(int(np.argmin(sol)))
        return np.zeros(len(fit.coef))

    rng = random.Random(0)
    step, one_seq, falling, draft = StepOverhead(), StepOverhead(), StepOverhead(), DraftTime()
    for _ in range(200):
        s, k = rng.choice([1, 2, 4, 8]), rng.randint(0, 6)
        step.observe(s, k, 0.001 + 0.0002 * s + 0.0001 * k + rng.gauss(0, 1e-4))
        one_seq.observe(1, k, 0.001 + 0.0001 * k + rng.gauss(0, 1e-4))
        falling.observe(s, k, 0.004 - 0.0002 * s + 0.0001 * k + rng.gauss(0, 1e-5))
        n = rng.randint(1, 5)
        draft.observe(n, 0.002 + 0.0005 * (n - 1) + rng.gauss(0, 1e-4))
        for fit in (step, one_seq, falling, draft):
            ref = reference(fit)
            xs = [[1.0, s, k] for s in (1, 4, 16) for k in (0, 3, 12)] if len(ref) == 3 else [[1.0, 0], [1.0, 4]]
            assert [fit.coef @ x for x in xs] == pytest.approx([ref @ x for x in xs], rel=1e-3)
    assert falling.coef[1] == 0.0


def test_a_cost_per_sequence_does_not_make_drafts_dearer_but_a_cost_per_draft_does():
    def plan(coef) -> int:
        policy = AdaptiveSpecPolicy(8, linear_cost(per_row=0.0006))
        policy.overhead.coef = np.array(coef)
        return sum(policy.plan([0.6] * 8, 8))

    none = plan([0.0, 0.0, 0.0])
    assert plan([0.004, 0.001, 0.0]) >= none  # a dearer step: drafts pay for more of it
    assert plan([0.0, 0.0, 0.002]) < none


def test_acceptance_history_moves_the_plan_and_idle_sequences_are_probed():
    policy = AdaptiveSpecPolicy(4, linear_cost(per_row=0.004), probe_every=3)
    for _ in range(30):
        policy.update("bad", 4, 0)
        policy.update("good", 4, 4)
    assert policy.acceptance("good") > 0.9
    assert policy.acceptance("bad") < 0.1
    plans = [policy.budgets(["good", "bad"], 2) for _ in range(3)]
    assert all(p[0] > 0 for p in plans)
    assert [p[1] for p in plans] == [0, 0, 1]  # the third idle step probes with one draft
    policy.release("bad")
    assert policy.acceptance("bad") == policy.prior_acceptance


def test_idle_sequences_are_probed_in_the_same_step():
    """Sequences that fell idle at different steps are probed together (one drafting call
    for all of them), each at most `probe_every` - 1 steps late."""
    policy = AdaptiveSpecPolicy(4, linear_cost(per_row=0.004), probe_every=4)
    for _ in range(30):
        for rid in "abc":
            policy.update(rid, 4, 0)
    ids = ["a"]
    probes = []
    for step in range(16):
        if step in (2, 5):
            ids.append("bc"[step == 5])  # joins idle later
        probes.append([rid for rid, k in zip(ids, policy.budgets(ids, len(ids))) if k])
    probed_steps = [i for i, p in enumerate(probes) if p]
    assert probed_steps == [3, 7, 11, 15]
    assert probes[3] == ["a"] and probes[7] == ["a", "b"] and probes[11] == ["a", "b", "c"]


def test_rejected_probes_wait_longer_and_an_accepted_one_resets_the_wait():
    policy = AdaptiveSpecPolicy(4, linear_cost(per_row=0.004), probe_every=2, probe_backoff=4)
    for _ in range(30):
        policy.update("a", 4, 0)

    def probe_steps(steps: int, accepted: int) -> list[int]:
        probed = []
        for step in range(steps):
            if policy.budgets(["a"], 1)[0]:
                probed.append(step)
                policy.update("a", 1, accepted)
        return probed

    # probes every 2 steps at first; each rejection doubles the wait, capped at 8 steps
    # (probe_backoff x probe_every)
    first = probe_steps(40, 0)
    assert np.diff(first).tolist()[:4] == [4, 8, 8, 8]
    assert first[0] <= 1
    before = policy.acceptance("a")
    policy.update("a", 1, 1)  # an accepted probe (or draft): back to probing every 2 steps
    assert policy.acceptance("a") > before
    again = probe_steps(20, 0)
    assert again[0] <= 2 and np.diff(again).tolist()[:2] == [4, 8]
    # a probe the drafter proposed nothing for has no outcome: the wait stays
    wait = dict(policy._wait)
    while not policy.budgets(["a"], 1)[0]:
        pass
    policy.update("a", 0, 0)
    assert policy._wait == wait and not policy._probing
    policy.release("a")
    assert not policy._wait and not policy._probing


def test_longer_contexts_make_drafts_dearer():
    seqs, tokens = (1, 2, 4, 8, 16), (1, 2, 3, 5, 9)
    table = tuple(tuple(0.015 + 0.0003 * s * (t - 1) for t in tokens) for s in seqs)
    cost = ForwardCost(seqs, tokens, table, context=128, per_row_key=3e-7)
    assert cost(16, 32, 1128) == pytest.approx(cost(16, 32) + 3e-7 * 32 * 1000)
    assert cost(16, 32, None) == cost(16, 32)
    assert cost(1, 1, 0) >= 0.5 * cost(1, 1)  # a short context never makes a forward free
    policy = AdaptiveSpecPolicy(8, cost)
    ids = [f"r{i}" for i in range(16)]
    short, long = sum(policy.budgets(ids, 16, 128)), sum(policy.budgets(ids, 16, 3000))
    assert long < short
    with pytest.raises(ValueError, match=">= 0"):
        ForwardCost((1,), (1,), ((0.1,),), per_row_key=-1e-7)


def test_vectorised_costs_equal_the_scalar_ones():
    seqs, tokens = (1, 2, 4, 8, 16), (1, 2, 3, 5, 9)
    table = tuple(tuple(0.015 + 0.0003 * s * (t - 1) + 0.0001 * t * t for t in tokens) for s in seqs)
    for cost in (ForwardCost(seqs, tokens, table, context=128, per_row_key=3e-7), ForwardCost.flat(0.02)):
        for num_seqs in (1, 3, 4, 16, 40):
            n = np.arange(num_seqs, num_seqs * 12 + 1)
            for context in (None, 50.0, 2000.0):
                assert cost.many(num_seqs, n, context) == pytest.approx([cost(num_seqs, int(k), context) for k in n])


def test_a_gain_within_the_margin_drafts_nothing():
    # one draft row makes the step 1.35x dearer, so one draft at acceptance a changes goodput by
    # (1 + a) / 1.35: +5.2% at a = 0.42, +1.5% at a = 0.37 (below the 3% margin)
    cost = linear_cost(base=0.01, per_seq=0.0, per_row=0.0035 / 0.65)
    assert cost(1, 2) / cost(1, 1) == pytest.approx(1.35)
    assert AdaptiveSpecPolicy(1, cost).plan([0.42], 1) == [1]
    assert AdaptiveSpecPolicy(1, cost).plan([0.37], 1) == [0]
    assert AdaptiveSpecPolicy(1, cost, min_gain=0.0).plan([0.37], 1) == [1]


def test_tree_confidence_plans_what_the_tree_will_accept():
    """A tree drafter's confidences (its second draft is often a likely sibling) raise the
    plan above the chain model's a^j; the calibration learned from verifications scales them
    (a drafter whose confident drafts are rejected gets smaller budgets), and a sequence
    without confidences keeps the chain model."""
    cost = linear_cost(per_row=0.002)
    policy = AdaptiveSpecPolicy(8, cost, prior_acceptance=0.35)
    chain_only = policy.plan([0.35], 1)
    tree = np.array([0.55, 0.45, 0.3, 0.2, 0.1, 0.05, 0.0, 0.0])
    assert sum(policy.plan([0.35], 1, [tree])) > sum(chain_only)
    assert policy.plan([0.35, 0.35], 2, [tree, None])[1] == policy.plan([0.35, 0.35], 2)[1]
    # verifications teach a request's smoothed confidence and the calibration
    policy.update("r", 2, 1, list(tree), 4)
    assert policy._stats["r"].gains == pytest.approx(tree)
    assert policy.calibration() == pytest.approx((4 * 0.98 + 1) / (4 * 0.98 + 1.5))  # 4 verified: 1.5 expected
    for _ in range(20):  # more accepted than the confidence promised: the scale stays at most 1
        policy.update("s", 2, 3, [0.3, 0.2, 0.1], 3)
    assert policy.calibration() == 1.0
    for _ in range(150):  # confident drafts, none accepted: the drafter's word counts for little
        policy.update("r", 2, 0, list(tree), 4)
    assert policy.calibration() < 0.1
    assert sum(policy.budgets(["r"], 1)) <= sum(chain_only)
    with pytest.raises(ValueError, match="probe_every"):
        AdaptiveSpecPolicy(8, cost, probe_every=0)
    with pytest.raises(ValueError):
        from specserve.spec.base import DraftProposal

        DraftProposal([[1, 2]], confidence=[[0.5]])  # must cover every draft


def test_a_tree_drafters_first_draft_and_further_drafts_are_priced_apart():
    """An EAGLE head drafts its first token from the catch-up forward (about 1 ms more) and
    each further depth with a head forward (3.3 ms): fitted per call, the first and the
    further drafts get their own prices, where a mean per token (~2 ms) made a second draft
    look cheap and a first one dear. At batch size 1, with rows 2 and 3 of the forward
    costing 1.4 and 2.0 ms, the mean drafts two tokens where the second does not pay."""
    policy = AdaptiveSpecPolicy(4, ForwardCost((1,), (1, 2, 3, 5), ((0.0176, 0.0190, 0.0210, 0.0300),)))
    policy.observe_draft_time(0.0021, 2)  # a single call cannot tell the parts apart: the mean per token
    assert policy.draft_first == policy.draft_cost == pytest.approx(0.00105)
    for _ in range(20):
        policy.observe_draft_time(0.0010 + 0.0016, 1, catch_up=0.0016)
        policy.observe_draft_time(0.0043 + 0.0016, 2, catch_up=0.0016)
    assert policy.draft_first == pytest.approx(0.0010, rel=0.02)
    assert policy.draft_cost == pytest.approx(0.0033, rel=0.02)
    gains = np.array([0.46, 0.30, 0.1, 0.05])
    policy._calib = [1.0, 1.0]
    assert policy.plan([0.46], 1, [gains]) == [1]
    mean = AdaptiveSpecPolicy(4, policy.verify_cost, draft_cost=0.002, draft_first=0.002, _calib=[1.0, 1.0])
    assert mean.plan([0.46], 1, [gains]) == [2]
    # where every call drafts one token, that token's time is the cost of every draft
    single = AdaptiveSpecPolicy(4, policy.verify_cost)
    for _ in range(10):
        single.observe_draft_time(0.003, 1)
    assert single.draft_first == single.draft_cost == pytest.approx(0.003)
