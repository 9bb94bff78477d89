"""How many tokens to draft for each sequence at each step.

`AdaptiveSpecPolicy` plans the draft lengths of the whole batch at once (load-aware
speculation, SmartSpec/TETRIS style). Per sequence it keeps a decayed estimate of the
per-token acceptance probability `a_i`, so the j-th draft token of sequence i is
accepted with probability `a_i^j`. The step's cost is modelled as

    t(K) = f(N + K) + c * S + K * t_draft

with `f(n)` the target forward time over n tokens (measured at start-up), N the tokens
the step runs anyway (one per decoding sequence plus prefill chunks), S the number of
sequences, `c` a per-sequence overhead learned from measured step times, and `t_draft`
the drafting time per token. The plan adds draft tokens in order of acceptance
probability and keeps the count K that maximises goodput

    (S + sum of the chosen a_i^j) / t(K)

so speculation shrinks as the batch grows (the forward stops being flat in n) and
switches off when it would slow the batch down. A single sequence gets the classic
choice of k. Sequences left at zero drafts are re-probed now and then, and their
estimates drift back toward the prior, so text that becomes predictable is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class SpecPolicy(Protocol):
    def budgets(self, request_ids: list[str], other_tokens: int) -> list[int]: ...

    def update(self, request_id: str, drafted: int, accepted: int) -> None: ...

    def observe_draft_time(self, seconds: float, num_tokens: int) -> None: ...

    def observe_step(self, num_seqs: int, num_tokens: int, seconds: float) -> None: ...

    def release(self, request_id: str) -> None: ...


@dataclass
class FixedSpecPolicy:
    """Always the same draft budget (the drafter may still propose fewer)."""

    k: int

    def budgets(self, request_ids: list[str], other_tokens: int) -> list[int]:
        return [self.k] * len(request_ids)

    def update(self, request_id: str, drafted: int, accepted: int) -> None:
        pass

    def observe_draft_time(self, seconds: float, num_tokens: int) -> None:
        pass

    def observe_step(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


@dataclass
class _Stats:
    accepted: float
    rejected: float


@dataclass
class AdaptiveSpecPolicy:
    """Load-aware draft lengths from acceptance history and a measured cost model.

    `verify_cost[n - 1]` is the target forward time for n tokens (seconds), linearly
    extrapolated past its end; `draft_cost` the drafting time per token (seconds) and
    `seq_overhead` the step time per sequence beyond the forward, both updated from
    measurements.
    """

    max_k: int
    verify_cost: list[float]
    draft_cost: float = 0.0
    seq_overhead: float = 0.0
    prior_acceptance: float = 0.6
    prior_weight: float = 4.0
    decay: float = 0.9
    probe_every: int = 8
    _stats: dict[str, _Stats] = field(default_factory=dict)
    _draft_samples: int = 0
    _step_samples: int = 0
    _step_draft_time: float = 0.0
    _idle: dict[str, int] = field(default_factory=dict)  # steps without drafting, per request

    def __post_init__(self) -> None:
        if self.max_k < 0:
            raise ValueError(f"max_k must be >= 0, got {self.max_k}")
        if not self.verify_cost:
            raise ValueError("verify_cost needs at least one entry")

    def acceptance(self, request_id: str) -> float:
        st = self._stats.get(request_id)
        if st is None:
            return self.prior_acceptance
        return st.accepted / max(st.accepted + st.rejected, 1e-9)

    def forward_cost(self, n: int) -> float:
        """Target forward time over n tokens (n >= 1)."""
        table = self.verify_cost
        if n <= len(table):
            return table[max(n, 1) - 1]
        slope = (table[-1] - table[len(table) // 2 - 1]) / (len(table) - len(table) // 2) if len(table) > 1 else 0.0
        return table[-1] + (n - len(table)) * max(slope, 0.0)

    def _step_cost(self, base_tokens: int, num_seqs: int, drafts: int) -> float:
        return self.forward_cost(base_tokens + drafts) + self.seq_overhead * num_seqs + drafts * self.draft_cost

    def plan(self, acceptances: list[float], base_tokens: int) -> list[int]:
        """Draft lengths maximising expected tokens per second for one step."""
        S = len(acceptances)
        gains = []  # (probability the j-th draft of sequence i is accepted, i)
        for i, a in enumerate(acceptances):
            a = min(max(a, 0.0), 0.999)
            gains.extend((a ** (j + 1), i) for j in range(self.max_k))
        gains.sort(key=lambda g: -g[0])
        expected, best_rate, best_count = float(S), S / self._step_cost(base_tokens, S, 0), 0
        for count, (gain, _) in enumerate(gains, start=1):
            expected += gain
            rate = expected / self._step_cost(base_tokens, S, count)
            if rate > best_rate * 1.001:
                best_rate, best_count = rate, count
        ks = [0] * S
        for _, i in gains[:best_count]:
            ks[i] += 1
        return ks

    def best_k(self, a: float) -> int:
        """The draft length for a sequence decoded alone with acceptance `a`."""
        return self.plan([a], 1)[0]

    def budgets(self, request_ids: list[str], other_tokens: int) -> list[int]:
        ks = self.plan([self.acceptance(r) for r in request_ids], max(other_tokens, len(request_ids)))
        for idx, (rid, k) in enumerate(zip(request_ids, ks)):
            if k == 0:
                idle = self._idle.get(rid, 0) + 1
                self._idle[rid] = idle
                if idle % self.probe_every == 0:
                    ks[idx] = 1  # probe: has the text become predictable?
        return ks

    def update(self, request_id: str, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        st = self._stats.get(request_id)
        if st is None:
            w = self.prior_weight
            st = self._stats[request_id] = _Stats(self.prior_acceptance * w, (1 - self.prior_acceptance) * w)
        st.accepted = st.accepted * self.decay + accepted
        st.rejected = st.rejected * self.decay + (1 if accepted < drafted else 0)
        self._idle.pop(request_id, None)

    def observe_draft_time(self, seconds: float, num_tokens: int) -> None:
        self._step_draft_time += seconds
        if num_tokens > 0:
            per_token = seconds / num_tokens
            self.draft_cost = per_token if self._draft_samples == 0 else 0.8 * self.draft_cost + 0.2 * per_token
            self._draft_samples += 1

    def observe_step(self, num_seqs: int, num_tokens: int, seconds: float) -> None:
        """Learn the per-sequence step overhead from a measured step."""
        drafting, self._step_draft_time = self._step_draft_time, 0.0
        if num_seqs <= 0:
            return
        per_seq = max(0.0, seconds - drafting - self.forward_cost(num_tokens)) / num_seqs
        self.seq_overhead = per_seq if self._step_samples == 0 else 0.9 * self.seq_overhead + 0.1 * per_seq
        self._step_samples += 1

    def release(self, request_id: str) -> None:
        self._stats.pop(request_id, None)
        self._idle.pop(request_id, None)
