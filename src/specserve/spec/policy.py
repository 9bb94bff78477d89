"""How many tokens to draft for each sequence at each step.

`AdaptiveSpecPolicy` plans the draft lengths of the whole batch at once (load-aware
speculation, SmartSpec/TETRIS style). Per sequence it keeps a decayed estimate of the
per-token acceptance probability `a_i`, so the j-th draft token of sequence i is
accepted with probability `a_i^j`. The step's cost is modelled as

    t(K) = s * f(S, N + K) + c0 + c1 * S + (c2 + t_draft) * K

with `f(S, n)` the target forward time of S sequences holding n tokens in all, every
row's logits kept as verification needs them (a table measured at start-up over batch
shapes: the cost of a draft token depends on the batch, since each sequence's query
rows attend over its own context), plus, for the batch's mean context c, the measured
attention cost of every row per cached key times (c - the table's context): a drafted
row over 1,000 cached tokens costs more than over 100. N is the tokens the step runs
anyway (one per decoding sequence plus prefill chunks), `s` the ratio of measured to
tabled forward times, `t_draft` the drafting time per token, and c0 + c1 * S + c2 * K the
rest of the step (scheduling, verification, bookkeeping), fitted to measured steps: a
fixed cost, one per sequence and one per draft token. Only the last part and the forward
grow with K; a cost per sequence makes the step dearer without making drafts dearer.
The plan adds draft tokens in order of acceptance
probability and keeps the count K that maximises goodput

    (S + sum of the chosen a_i^j) / t(K)

so speculation shrinks as the batch grows (the forward stops being flat in n) and
switches off when it would slow the batch down. In a step that also runs prefill chunks,
the chunks' time is spent whatever is drafted: t(K) there is t(0) of the same sequences
decoding alone plus what the K drafts add to the step, so a long chunk, which makes the
step slow, does not make drafts look free. A plan predicted to beat no drafting
by less than `min_gain` (3%) drafts nothing: near break-even the prediction's error
(the cost table is measured once, the batch's shapes vary) is as large as the gain, and a
saturated batch (16+ sequences on 2 cores) would lose as often as it wins. The margin is a share of the
whole batch's goodput, so in a large batch one predictable sequence may go undrafted
when drafting for it alone would gain less than that share. A single sequence gets the classic
choice of k. Sequences left at zero drafts are re-probed now and then (all of them in
the same step, so a model drafter pays one call); a probe's outcome updates the estimate as
any verification does (older evidence decays), so text that becomes predictable is noticed.
A drafter that keeps a backlog (an EAGLE head catches up on the features of the tokens
accepted since it last drafted for a sequence) has it priced: its catch-up calls are fitted
as a fixed part, added to a step's first draft, plus a part per row, times each sequence's
pending rows past its prompt (at most `probe_every` steps of `1 + max_k` rows), added with
that sequence's first draft; drafts are then taken in order of gain per second, so one dear
backlog does not bar the others. At c=32 the hybrid's catch-ups came to 2.1 ms of a 40 ms
step while the plan saw none of it.
A sequence is probed only where the plan would draft for it were its acceptance
`probe_acceptance` (0.9): where a drafted row costs a fifth of the batch's step (a 4-sequence
batch on 2 AVX2 cores), no outcome of the probe could make drafting pay, and each probe is a loss.
An idle sequence's estimate does not move between probes. A probe that is rejected doubles
the wait before that sequence's next one, up to `probe_backoff` times `probe_every` steps, and
one that is accepted (or any accepted draft) brings it back: on 2 Zen 3 cores a probe in a
4-sequence batch costs about 14% of the step, and at that load about 1 probe in 6 was accepted. A drafter that tells its confidence in
each draft (an EAGLE tree: the product of its draft probabilities along the path) has it
smoothed per request and calibrated against what verification accepts (scaled by at most 1);
the plan takes, per draft, the larger of a^j and that estimate, since a tree's next draft is
often a sibling, likelier than a chain's a^j.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class SpecPolicy:
    """Draft budgets per step. The learning hooks do nothing here: a policy that learns
    from acceptance and step times (`AdaptiveSpecPolicy`) overrides them."""

    def budgets(
        self,
        request_ids: list[str],
        other_tokens: int,
        context: float | None = None,
        pending: list[int | None] | None = None,
    ) -> list[int]:
        raise NotImplementedError

    def update(
        self, request_id: str, drafted: int, accepted: int, confidence: list[float] | None = None, verified: int = 0
    ) -> None:
        pass

    def observe_draft_time(
        self, seconds: float, num_tokens: int, catch_up: float = 0.0, catch_up_rows: int = 0
    ) -> None:
        pass

    def observe_step(
        self,
        num_seqs: int,
        num_tokens: int,
        seconds: float,
        forward_seconds: float | None = None,
        drafted: int = 0,
        decoding: int | None = None,
    ) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


@dataclass
class FixedSpecPolicy(SpecPolicy):
    """Always the same draft budget (the drafter may still propose fewer)."""

    k: int

    def budgets(
        self,
        request_ids: list[str],
        other_tokens: int,
        context: float | None = None,
        pending: list[int | None] | None = None,
    ) -> list[int]:
        return [self.k] * len(request_ids)


@dataclass(frozen=True)
class ForwardCost:
    """Target forward time by batch shape: `seconds[i][j]` for `seqs[i]` sequences of
    `tokens[j]` tokens each (both grids ascending, starting at 1).

    `one_more[i]`, where given, is the time of `seqs[i]` sequences with one more row than one
    token each (a step's first draft): a knot at 1 + 1/seqs[i] tokens per sequence. The first
    row past a full set of tiles costs more than the table's mean row does (at 4 sequences on
    Zen 3, 3.0 ms against 2.45 ms: the fifth row reads the full LM head instead of the
    screened one and splits the rows into smaller tiles; at 8 sequences 5.5 against 3.3 ms).

    Between grid points it interpolates linearly; past the last token count it
    extrapolates the last slope, past the last sequence count it scales proportionally.
    """

    seqs: tuple[int, ...]
    tokens: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]
    context: int = 0  # cached tokens per sequence the table was measured at
    per_row_key: float = 0.0  # seconds per forward row per cached key past (or short of) `context`
    one_more: tuple[float, ...] | None = None  # seqs[i] sequences, one of them with 2 tokens

    def __post_init__(self) -> None:
        if not self.seqs or not self.tokens or self.seqs[0] != 1 or self.tokens[0] != 1:
            raise ValueError("a forward cost table needs grids starting at 1 sequence and 1 token")
        if list(self.seqs) != sorted(set(self.seqs)) or list(self.tokens) != sorted(set(self.tokens)):
            raise ValueError("forward cost grids must be strictly ascending")
        if len(self.seconds) != len(self.seqs) or any(len(row) != len(self.tokens) for row in self.seconds):
            raise ValueError("forward cost table shape does not match its grids")
        if self.context < 0 or self.per_row_key < 0:
            raise ValueError("a forward cost table's context and per-row-key cost must be >= 0")
        if self.one_more is not None and len(self.one_more) != len(self.seqs):
            raise ValueError("a forward cost table's one_more needs one time per sequence count")

    @classmethod
    def flat(cls, seconds: float) -> ForwardCost:
        """The same time for any batch (a forward that costs nothing more per token)."""
        return cls((1,), (1,), ((seconds,),))

    def many(self, num_seqs: int, num_tokens: np.ndarray, context: float | None = None) -> np.ndarray:
        """`self(num_seqs, n, context)` for every n of `num_tokens` (one vectorised call)."""
        num_seqs = max(num_seqs, 1)
        tokens = np.asarray(num_tokens, dtype=float)
        per_seq = np.maximum(tokens / num_seqs, 1.0)
        grid = self.seqs
        if num_seqs >= grid[-1]:
            base = self._row(len(grid) - 1, per_seq) * num_seqs / grid[-1]
        else:
            i = next(i for i in range(1, len(grid)) if grid[i] >= num_seqs)
            w = (num_seqs - grid[i - 1]) / (grid[i] - grid[i - 1])
            base = (1 - w) * self._row(i - 1, per_seq) + w * self._row(i, per_seq)
        if context is None or not self.per_row_key:
            return base
        return np.maximum(base + self.per_row_key * np.maximum(tokens, num_seqs) * (context - self.context), 0.5 * base)

    def _row(self, i: int, per_seq: np.ndarray) -> np.ndarray:
        """Row i of the table at `per_seq` tokens per sequence, with its one-more-row knot."""
        grid, row = self.tokens, self.seconds[i]
        if self.one_more is not None and len(grid) > 1:
            knot = 1.0 + 1.0 / self.seqs[i]
            j = int(np.searchsorted(grid, knot))
            if j < len(grid) and grid[j] != knot:  # inside the grid, not on a point of it
                lo, hi = row[j - 1], row[j]
                grid = (*grid[:j], knot, *grid[j:])
                row = (*row[:j], min(max(self.one_more[i], lo), hi), *row[j:])
        return _interp(grid, row, per_seq)

    def __call__(self, num_seqs: int, num_tokens: int, context: float | None = None) -> float:
        """Forward time of `num_seqs` sequences with `num_tokens` tokens in all (and a
        mean of `context` cached tokens per sequence, where known)."""
        return float(self.many(num_seqs, np.array([num_tokens]), context)[0])


class _NonNegativeFit:
    """Least squares y ~ coef . x over observations with exponential forgetting, every
    coefficient kept >= 0 (one that would come out negative is dropped and the rest refitted).
    A small ridge shrinks the coefficients marked in `shrink`: where the data cannot tell the
    parts apart, the unshrunk ones take the time."""

    def __init__(self, shrink: tuple[bool, ...], forget: float, ridge: float = 1e-5) -> None:
        n = len(shrink)
        self.shrink, self.forget, self.ridge = shrink, forget, ridge
        self.gram = np.zeros((n, n))
        self.moment = np.zeros(n)
        self.coef = np.zeros(n)
        self.samples = 0

    def add(self, x: np.ndarray, y: float) -> None:
        y = max(y, 0.0)
        if self.samples >= 8:  # a stray slow sample (a collection pause) counts as at most 3x the model
            y = min(y, 3.0 * float(self.coef @ x) + 1e-3)
        self.gram = self.forget * self.gram + np.outer(x, x)
        self.moment = self.forget * self.moment + x * y
        self.samples += 1
        self.coef = self._fit()

    def _fit(self) -> np.ndarray:
        # plain floats: the systems are 2x2 or 3x3, and numpy's per-call overhead on them
        # (an `ix_`, a `diag`, an `lstsq` per try) came to about 0.4 ms a fit, twice a step
        n = len(self.coef)
        gram, moment = self.gram.tolist(), self.moment.tolist()
        active = list(range(n))
        while active:
            ridge = self.ridge * max(sum(gram[j][j] for j in active), 1.0)
            a = [[gram[i][j] + (ridge if i == j and self.shrink[i] else 0.0) for j in active] for i in active]
            sol = _solve(a, [moment[i] for i in active])
            if min(sol) >= 0:
                coef = np.zeros(n)
                coef[active] = sol
                return coef
            active.pop(sol.index(min(sol)))
        return np.zeros(n)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """The least-squares solution of a x = b for a small square `a`: Gaussian elimination
    with partial pivoting where every pivot is clear of zero (then the solution is
    `lstsq`'s, to rounding), else `lstsq` (a singular or near-singular system: its
    minimum-norm solution)."""
    n = len(b)
    scale = max(abs(v) for row in a for v in row)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) <= 1e-12 * scale:
            return np.linalg.lstsq(np.array(a), np.array(b), rcond=None)[0].tolist()
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for c in reversed(range(n)):
        x[c] = (m[c][n] - sum(m[c][k] * x[k] for k in range(c + 1, n))) / m[c][c]
    return x


class StepOverhead(_NonNegativeFit):
    """The part of a step's time outside the forward and the drafting, as c0 + c1 * S + c2 * K
    (S sequences, K draft tokens), fitted over the measured steps. The fixed part is not
    shrunk: where S and K hardly vary it takes the time, rather than a per-draft cost that
    would make drafting look dear."""

    def __init__(self, forget: float = 0.98, ridge: float = 1e-5) -> None:
        super().__init__((False, True, True), forget, ridge)

    def observe(self, num_seqs: int, drafted: int, seconds: float) -> None:
        self.add(np.array([1.0, float(num_seqs), float(drafted)]), seconds)

    def __call__(self, num_seqs: int, drafted):
        """Seconds for `drafted` draft tokens (an int, or an array of counts)."""
        c0, c1, c2 = self.coef
        return c0 + c1 * num_seqs + c2 * drafted


class DraftTime(_NonNegativeFit):
    """A drafting call's time (its catch-up left out) as `first` for its first draft token
    plus `further` for each other one, fitted over the calls. An EAGLE head's first draft
    comes from its catch-up forward and costs little more, and each further depth costs a
    head forward: a mean per token would price the first draft too high and the second too
    low. Until the calls have drafted different numbers of tokens the two parts cannot be
    told apart, and both are the mean time per draft token."""

    def __init__(self, forget: float = 0.95) -> None:
        super().__init__((False, False), forget)

    def observe(self, num_tokens: int, seconds: float) -> None:
        self.add(np.array([1.0, float(num_tokens - 1)]), seconds)

    def parts(self) -> tuple[float, float]:
        """(first, further) in seconds."""
        n, more = self.gram[0, 0], self.gram[0, 1]
        if n <= 0:
            return 0.0, 0.0
        if self.gram[1, 1] / n - (more / n) ** 2 < 0.05:  # (almost) every call drafted as many tokens
            per_token = float(self.moment[0] / (n + more))
            return per_token, per_token
        first, further = self.coef
        return float(first), float(further)


class CatchUpTime(_NonNegativeFit):
    """A drafter's catch-up per call as a fixed part (one forward of its own, whatever the
    rows) plus a part per row, fitted over the calls that caught up. The per-row part is
    shrunk: where every call catches up about as many rows, the fixed part takes the time."""

    def __init__(self, forget: float = 0.95) -> None:
        super().__init__((False, True), forget)

    def observe(self, rows: int, seconds: float) -> None:
        self.add(np.array([1.0, float(rows)]), seconds)


def _interp(grid: tuple[float, ...], row: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    """One row of a cost table at token counts per sequence `x`: linear between grid points,
    the last slope past the grid, never below the one-token time."""
    if len(grid) == 1:
        return np.full(x.shape, row[0])
    g, r = np.asarray(grid, dtype=float), np.asarray(row, dtype=float)
    out = np.interp(x, g, r)
    past = x > g[-1]  # the last slope past the grid
    out[past] = r[-1] + (x[past] - g[-1]) * (r[-1] - r[-2]) / (g[-1] - g[-2])
    return np.maximum(out, r[0])


@dataclass
class _Stats:
    accepted: float
    rejected: float
    gains: np.ndarray | None = None  # smoothed draft confidence of the j-th draft, where the drafter tells


@dataclass
class AdaptiveSpecPolicy(SpecPolicy):
    """Load-aware draft lengths from acceptance history and a measured cost model.

    `verify_cost` is the measured target forward time by batch shape; `draft_first` the
    drafting time of a call's first draft token and `draft_cost` of each further one
    (seconds), `scale` the ratio of measured forward time to the table's and `overhead` the
    rest of a step, all updated from measurements.
    """

    max_k: int
    verify_cost: ForwardCost
    draft_cost: float = 0.0
    draft_first: float = 0.0
    scale: float = 1.0
    prior_acceptance: float = 0.6
    prior_weight: float = 4.0
    decay: float = 0.9
    probe_every: int = 8
    probe_acceptance: float = 0.9  # probe only sequences that would be drafted for at this acceptance
    probe_backoff: int = 4  # rejected probes stretch a sequence's wait up to this many times probe_every
    min_gain: float = 0.03  # draft only when the plan beats no drafting by this share of goodput
    confidence_weight: float = 0.5  # weight of a step's draft confidences in a request's smoothed gains
    _stats: dict[str, _Stats] = field(default_factory=dict)
    # calibration of draft confidences: accepted drafts against the confidence summed over the
    # verified drafts, both decayed (starts at 1: the drafter's word)
    _calib: list[float] = field(default_factory=lambda: [4.0, 4.0])
    _draft_fit: DraftTime = field(default_factory=DraftTime)
    _step_samples: int = 0
    _step_draft_time: float = 0.0
    _idle: dict[str, int] = field(default_factory=dict)  # steps without drafting, per request
    _wait: dict[str, int] = field(default_factory=dict)  # idle steps before a probe, where not probe_every
    _probing: set[str] = field(default_factory=set)  # requests probed and not yet verified
    _planned_steps: int = 0
    _context: float | None = None  # mean cached tokens per sequence of the step being planned
    overhead: StepOverhead = field(default_factory=StepOverhead)
    catch_up: CatchUpTime = field(default_factory=lambda: CatchUpTime())

    def __post_init__(self) -> None:
        if self.max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {self.max_k}")
        if self.probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {self.probe_every}")
        if self.probe_backoff < 1:
            raise ValueError(f"probe_backoff must be >= 1, got {self.probe_backoff}")
        if not isinstance(self.verify_cost, ForwardCost):
            raise TypeError(f"verify_cost must be a ForwardCost, got {type(self.verify_cost).__name__}")

    def acceptance(self, request_id: str) -> float:
        st = self._stats.get(request_id)
        if st is None:
            return self.prior_acceptance
        return st.accepted / max(st.accepted + st.rejected, 1e-9)

    def calibration(self) -> float:
        """Accepted drafts per unit of the drafter's confidence (1 = calibrated), at most 1:
        a tree's sibling confidences add up to at most their parent's, and scaled up they
        could promise more than one token per depth."""
        return min(self._calib[0] / max(self._calib[1], 1e-9), 1.0)

    def plan(
        self,
        acceptances: list[float],
        base_tokens: int,
        confidences: list[np.ndarray | None] | None = None,
        entry: list[float | None] | None = None,
    ) -> list[int]:
        """Draft lengths maximising expected tokens per second for one step. The j-th draft
        of sequence i is accepted with probability a_i^j or, where `confidences[i]` (the
        drafter's smoothed confidence in its j-th draft) says more, the calibrated confidence:
        a tree's second draft is often a sibling of the first, likelier than the chain's a^2.
        `entry[i]` (seconds) is added to the step with sequence i's first draft: the drafter's
        catch-up over that sequence's backlog, paid only by a step that drafts for it; the
        catch-up's fixed part is added once, with the first draft of a sequence whose entry
        is not None (None: its drafts would not run the drafter's model, a hybrid's copy)."""
        S = len(acceptances)
        gains = []  # (probability the j-th draft of sequence i is accepted, i)
        calib = self.calibration()
        for i, a in enumerate(acceptances):
            a = min(max(a, 0.0), 0.999)
            chain = a ** np.arange(1, self.max_k + 1)
            conf = confidences[i] if confidences is not None else None
            if conf is not None:  # both non-increasing in j: so is their maximum
                chain = np.maximum(chain, np.minimum(calib * conf[: self.max_k], 0.999))
            gains.extend((float(g), i) for g in chain)
        # step time with 0, 1, 2, ... drafts (one vectorised cost call; any order of drafts)
        counts = np.arange(len(gains) + 1)
        cost = self.scale * self.verify_cost.many(S, base_tokens + counts, self._context)
        if gains and entry is not None and any(entry):
            # drafts in order of gain per second: a sequence's backlog divides all its gains
            # (keeping its drafts in chain order), so one dear backlog goes last instead of
            # barring the drafts after it from every prefix the plan tries
            row = max(float(cost[1] - cost[0]) + self.draft_cost + float(self.overhead.coef[2]), 1e-6)
            gains.sort(key=lambda g: -g[0] / (row + (entry[g[1]] or 0.0)))
        else:
            gains.sort(key=lambda g: -g[0])
        expected = S + np.concatenate(([0.0], np.cumsum([g for g, _ in gains])))
        drafting = np.where(counts > 0, self.draft_first + self.draft_cost * (counts - 1), 0.0)
        cost = cost + self.overhead(S, counts) + drafting
        if entry is not None:
            fixed = float(self.catch_up.coef[0])
            paid, seen, called = [0.0], set(), False
            for _, i in gains:
                add = 0.0
                if i not in seen and entry[i] is not None:
                    add = entry[i] + (fixed if not called else 0.0)
                    called = True
                paid.append(paid[-1] + add)
                seen.add(i)
            cost = cost + np.asarray(paid)
        if base_tokens > S:
            # prefill chunks ride in this step: their time is spent whatever is drafted, so
            # drafts are weighed by what they add against the rate of a step without them
            # (else a long chunk makes any draft look free and rides its cost on the decodes)
            plain = self.scale * self.verify_cost(S, S, self._context) + self.overhead(S, 0)
            cost = cost - cost[0] + plain
        rates = (expected / cost).tolist()
        best_rate, best_count = rates[0], 0
        for count in range(1, len(rates)):
            if rates[count] > best_rate * 1.001:
                best_rate, best_count = rates[count], count
        if best_rate < rates[0] * (1.0 + self.min_gain):
            best_count = 0  # a gain within the cost model's error is not worth the risk of a loss
        ks = [0] * S
        for _, i in gains[:best_count]:
            ks[i] += 1
        return ks

    def best_k(self, a: float) -> int:
        """The draft length for a sequence decoded alone with acceptance `a`."""
        return self.plan([a], 1)[0]

    def budgets(
        self,
        request_ids: list[str],
        other_tokens: int,
        context: float | None = None,
        pending: list[int | None] | None = None,
    ) -> list[int]:
        """Draft lengths for this step's decoding sequences, with `other_tokens` the tokens
        the step runs anyway, `context` their mean cached tokens (None: unknown) and
        `pending` the drafter's catch-up backlog per sequence in rows (None for the list: it
        keeps none; None for a sequence: its drafts would not run the drafter's model)."""
        self._context = context
        confidences = [st.gains if (st := self._stats.get(r)) is not None else None for r in request_ids]
        acceptances = [self.acceptance(r) for r in request_ids]
        base = max(other_tokens, len(request_ids))
        per_row = float(self.catch_up.coef[1])
        # a backlog is charged up to what probing on schedule leaves (probe_every steps of
        # 1 + max_k rows): past that the charge would only grow, and a sequence left idle at
        # high load could never be probed again; the probe that drafts pays the rest once
        cap = self.probe_every * (1 + self.max_k)
        entry = None if pending is None else [None if n is None else per_row * min(n, cap) for n in pending]
        ks = self.plan(acceptances, base, confidences, entry)
        # probe: has the text become predictable? Sequences idle for `probe_every` steps or
        # more are probed together, on every `probe_every`-th step: a drafter that runs a
        # model pays one call for all of them (staggered probes would make it run nearly
        # every step of a large batch, each call for one draft token)
        self._planned_steps += 1
        probe_now = self._planned_steps % self.probe_every == 0
        due = []
        for idx, (rid, k) in enumerate(zip(request_ids, ks)):
            if k == 0:
                idle = self._idle.get(rid, 0) + 1
                self._idle[rid] = idle
                if probe_now and idle >= self._wait.get(rid, self.probe_every):
                    due.append(idx)
        if due:
            # a probe is worth its draft only where some outcome could change the plan: with
            # the due sequences as predictable as `probe_acceptance`, would they be drafted for?
            # (On a CPU where each drafted row costs a fifth of a batch's step, they would not be.)
            hopeful = list(acceptances)
            for idx in due:
                hopeful[idx] = max(hopeful[idx], self.probe_acceptance)
            worth = self.plan(hopeful, base, confidences, entry)
            for idx in due:
                if worth[idx] > 0:
                    ks[idx] = 1
                    self._probing.add(request_ids[idx])
        return ks

    def update(
        self, request_id: str, drafted: int, accepted: int, confidence: list[float] | None = None, verified: int = 0
    ) -> None:
        """Learn from a verification: `drafted` draft positions (a tree's depth), `accepted`
        of them taken; `confidence` the drafter's (`DraftProposal.confidence`), of which the
        first `verified` entries were verified."""
        if drafted <= 0:
            self._probing.discard(request_id)  # probed, but the drafter proposed nothing: no outcome
            return
        st = self._stats.get(request_id)
        if st is None:
            w = self.prior_weight
            st = self._stats[request_id] = _Stats(self.prior_acceptance * w, (1 - self.prior_acceptance) * w)
        st.accepted = st.accepted * self.decay + accepted
        st.rejected = st.rejected * self.decay + (1 if accepted < drafted else 0)
        if confidence is not None and verified > 0:
            calib_decay = 0.98
            self._calib[0] = self._calib[0] * calib_decay + accepted
            self._calib[1] = self._calib[1] * calib_decay + float(sum(confidence[:verified]))
            conf = np.zeros(self.max_k)
            n = min(len(confidence), self.max_k)
            conf[:n] = np.minimum.accumulate(np.asarray(confidence[:n], dtype=float))  # n >= verified > 0
            w = self.confidence_weight
            st.gains = conf if st.gains is None else (1 - w) * st.gains + w * conf
        self._idle.pop(request_id, None)
        probed = request_id in self._probing
        self._probing.discard(request_id)
        if accepted > 0:
            self._wait.pop(request_id, None)
        elif probed:  # a rejected probe: wait twice as long for the next one
            wait = self._wait.get(request_id, self.probe_every)
            self._wait[request_id] = min(2 * wait, self.probe_every * self.probe_backoff)

    def observe_draft_time(
        self, seconds: float, num_tokens: int, catch_up: float = 0.0, catch_up_rows: int = 0
    ) -> None:
        """A drafting call of `seconds` proposed `num_tokens` drafts; `catch_up` of those
        seconds brought the drafter up to date over `catch_up_rows` rows
        (`DraftProposal.catch_up_seconds`, `catch_up_rows`). The whole call stays out of the
        step overhead's fit; the catch-up, which grows with the tokens since the drafter last
        ran rather than with the drafts, stays out of the drafting cost, fitted as the first
        draft token's and each further one's (`DraftTime`), and is fitted on its own as a
        fixed cost per call plus a cost per row (`CatchUpTime`)."""
        self._step_draft_time += seconds
        if catch_up_rows > 0:
            self.catch_up.observe(catch_up_rows, catch_up)
        if num_tokens > 0:
            self._draft_fit.observe(num_tokens, max(seconds - catch_up, 0.0))
            self.draft_first, self.draft_cost = self._draft_fit.parts()

    def observe_step(
        self,
        num_seqs: int,
        num_tokens: int,
        seconds: float,
        forward_seconds: float | None = None,
        drafted: int = 0,
        decoding: int | None = None,
    ) -> None:
        """Learn from a measured step: `seconds` in all, `forward_seconds` of them in the
        target forward (None: unknown, the whole step less drafting counts as forward),
        with `drafted` draft tokens among its `num_tokens`, and `decoding` of its
        `num_seqs` sequences decoding (the rest prefill chunks). Only steps that decode
        and prefill nothing teach the overhead, since plans are made for those."""
        drafting, self._step_draft_time = self._step_draft_time, 0.0
        context, self._context = self._context, None  # the planned step's; a step without a plan has none
        if num_seqs <= 0:
            return
        forward = seconds - drafting if forward_seconds is None else forward_seconds
        predicted = self.verify_cost(num_seqs, num_tokens, context)
        ratio = min(max(forward / predicted, 0.25), 4.0)
        self.scale = ratio if self._step_samples == 0 else 0.9 * self.scale + 0.1 * ratio
        self._step_samples += 1
        if forward_seconds is not None and decoding == num_seqs:
            self.overhead.observe(num_seqs, drafted, seconds - drafting - forward_seconds)

    def release(self, request_id: str) -> None:
        self._stats.pop(request_id, None)
        self._idle.pop(request_id, None)
        self._wait.pop(request_id, None)
        self._probing.discard(request_id)
