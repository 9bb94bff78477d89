"""How many tokens to draft for each sequence at each step.

`AdaptiveSpecPolicy` keeps, per sequence, a decayed estimate of the per-token
acceptance probability `a` and picks the draft length k that maximises expected
tokens per second:

    E[tokens](k) = (1 - a^(k+1)) / (1 - a)        (accepted drafts + the bonus token)
    cost(k)      = t_verify(k + 1) + k * t_draft

with `t_verify(n)` the target forward time over n tokens (measured at start-up, in
seconds) and `t_draft` the drafting time per token (a running average of what the
engine measures). k = 0 (no speculation) wins when the
drafts do not pay; the estimate drifts back toward the prior so a sequence whose text
becomes predictable again is re-probed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class SpecPolicy(Protocol):
    def budget(self, request_id: str) -> int: ...

    def update(self, request_id: str, drafted: int, accepted: int) -> None: ...

    def observe_draft_time(self, seconds: float, num_tokens: int) -> None: ...

    def release(self, request_id: str) -> None: ...


@dataclass
class FixedSpecPolicy:
    """Always the same draft budget (the drafter may still propose fewer)."""

    k: int

    def budget(self, request_id: str) -> int:
        return self.k

    def update(self, request_id: str, drafted: int, accepted: int) -> None:
        pass

    def observe_draft_time(self, seconds: float, num_tokens: int) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


@dataclass
class _Stats:
    accepted: float
    rejected: float


@dataclass
class AdaptiveSpecPolicy:
    """Per-sequence draft length from acceptance history and a measured cost model.

    `verify_cost[n - 1]` is the target forward time for n tokens (seconds);
    `draft_cost` the drafting time per token (seconds), updated from measurements.
    """

    max_k: int
    verify_cost: list[float]
    draft_cost: float = 0.0
    prior_acceptance: float = 0.6
    prior_weight: float = 4.0
    decay: float = 0.9
    probe_every: int = 8
    _stats: dict[str, _Stats] = field(default_factory=dict)
    _draft_samples: int = 0
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

    def _cost(self, k: int) -> float:
        n = min(k + 1, len(self.verify_cost))
        extra = k + 1 - n  # beyond the measured range: extrapolate linearly
        slope = self.verify_cost[-1] - self.verify_cost[-2] if len(self.verify_cost) > 1 else 0.0
        return self.verify_cost[n - 1] + extra * max(slope, 0.0) + k * self.draft_cost

    def best_k(self, a: float) -> int:
        a = min(max(a, 0.0), 0.999)
        best, best_rate = 0, 1.0 / self._cost(0)
        for k in range(1, self.max_k + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / self._cost(k)
            if rate > best_rate * 1.001:
                best, best_rate = k, rate
        return best

    def budget(self, request_id: str) -> int:
        k = self.best_k(self.acceptance(request_id))
        if k == 0:
            idle = self._idle.get(request_id, 0) + 1
            self._idle[request_id] = idle
            if idle % self.probe_every == 0:
                return 1  # probe: has the text become predictable?
        return k

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
        if num_tokens > 0:
            per_token = seconds / num_tokens
            self.draft_cost = per_token if self._draft_samples == 0 else 0.8 * self.draft_cost + 0.2 * per_token
            self._draft_samples += 1

    def release(self, request_id: str) -> None:
        self._stats.pop(request_id, None)
        self._idle.pop(request_id, None)
