"""The drafter protocol: what every drafter (n-gram, suffix, draft model, layer skip,
trained heads) offers the engine. The engine never branches on a drafter's name.

One step, for a batch of sequences (each with its own draft budget, zero included):

    proposal = drafter.propose(views, budgets)       # ragged chains (+ draft probs)
    ... target verifies [last token, d1..dk] of every sequence in one forward ...
    drafter.observe(views, num_accepted)             # outcome of the verification
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol
from typing import Sequence as Seq

import torch

from specserve.sampling.params import SamplingParams
from specserve.spec.tree import check_tree


@dataclass
class SequenceView:
    """What a drafter may read of one sequence."""

    request_id: str
    token_ids: list[int]  # prompt + output so far (the last one is not yet in the target's KV cache)
    num_prompt_tokens: int
    params: SamplingParams
    slot: int  # the sequence's KV slot in the target cache
    generator: torch.Generator | None = None  # the request's RNG (drafts sampled from q use it)


@dataclass
class DraftProposal:
    """Draft chains or trees for a batch, ragged: sequence i proposes `token_ids[i]` (maybe empty).

    `probs[i]` is the draft distribution q the tokens were drawn from, `[k_i, V]`
    float32, or None for drafters without one (n-gram, suffix: q is one-hot at the
    proposed token). Lossless sampling needs q exactly as the drafts were sampled.

    `parents[i]` is None for a chain, or the parent of every draft token of a token
    tree (see `specserve.spec.tree`); trees carry no q (their drafts are deterministic).

    `confidence[i]`, where a drafter can tell, is its estimate that each draft lies on the
    accepted path (a tree head: the product of its draft probabilities along the node's
    path), non-increasing, and may run on past `token_ids[i]` with the nodes a larger
    budget would have added next. The load-aware policy plans budgets with it (never
    verification: it changes no output). None: no estimate (a copied chain).

    `catch_up_seconds` is the part of the call spent bringing the drafter's own state up
    to date with tokens accepted since it last drafted (an EAGLE head's cache over the
    prompt and the accepted tokens' features), not on drafting: it grows with the tokens
    since the last call, not with the drafts asked for, so the load-aware policy does not
    count it in the cost of a draft token. `catch_up_rows` is how many rows that took: the
    policy learns the time per row and charges a sequence's backlog (`pending_rows` of a
    drafter that keeps one) to the first draft it plans for it in a step.
    """

    token_ids: list[list[int]]
    probs: list[torch.Tensor | None] = field(default_factory=list)
    parents: list[list[int] | None] = field(default_factory=list)
    confidence: list[list[float] | None] = field(default_factory=list)
    catch_up_seconds: float = 0.0
    catch_up_rows: int = 0

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        self.probs = self.probs or [None] * n
        self.parents = self.parents or [None] * n
        self.confidence = self.confidence or [None] * n
        if len(self.probs) != n or len(self.parents) != n or len(self.confidence) != n:
            raise ValueError("DraftProposal needs one probs, parents and confidence entry per sequence")
        for tokens, conf in zip(self.token_ids, self.confidence):
            if conf is not None and len(conf) < len(tokens):
                raise ValueError("a draft confidence list must cover every draft token")
        for tokens, parents, q in zip(self.token_ids, self.parents, self.probs):
            if parents is not None:
                check_tree(tokens, parents)
                if q is not None:
                    raise ValueError("a token tree is verified without a draft distribution (probs must be None)")

    @property
    def num_draft_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @property
    def cu_num_draft_tokens(self) -> list[int]:
        out, total = [0], 0
        for t in self.token_ids:
            total += len(t)
            out.append(total)
        return out


def check_budgets(seqs: Seq[SequenceView], budgets: Seq[int]) -> None:
    """One budget per sequence, none negative (a drafter's `propose` checks its arguments)."""
    if len(budgets) != len(seqs):
        raise ValueError(f"budgets must have one entry per sequence: got {len(budgets)} for {len(seqs)}")
    for b in budgets:
        if b < 0:
            raise ValueError(f"budgets must be >= 0, got {b!r}")


class Drafter(Protocol):
    """A source of draft tokens."""

    name: str

    def propose(self, seqs: Seq[SequenceView], budgets: Seq[int]) -> DraftProposal:
        """Up to `budgets[i]` draft tokens for sequence i (0 = none asked)."""
        ...

    def observe(self, seqs: Seq[SequenceView], num_accepted: Seq[int]) -> None:
        """Verification outcome: `num_accepted[i]` of sequence i's drafts were kept.

        Called after the sequence's tokens were updated (`seqs[i].token_ids` already
        holds the accepted tokens plus the bonus/recovered one).
        """
        ...

    def release(self, request_id: str) -> None:
        """The request finished or was aborted: drop its state."""
        ...
