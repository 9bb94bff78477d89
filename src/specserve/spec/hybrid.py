"""Retrieval first, a model drafter otherwise (SAM-Decoding style).

Copying drafters (n-gram, suffix) and model drafters fail in opposite places: a copy
is accepted for many tokens at once when the answer repeats its context (extraction,
summaries, code edits) and is absent or wrong in open text, where a trained head
still guesses well. `HybridDrafter` asks the retrieval drafter first, per sequence:

* a match of the context's last `min_match` (2) or more tokens seen before proposes
  the copied chain alone: the model drafter is not run for that sequence, so a step
  that copies pays no drafting forward;
* otherwise the model drafter proposes with the whole budget.

On the Spec-Bench first turns (`specserve bench run --methods ngram,ngram+eagle`),
a 2-token match gave a higher acceptance length than 1 or 3 tokens, and grafting the
copied chain of a weaker match onto the EAGLE tree (as a branch from the root, in place
of its lowest-scored nodes) lowered it (1.54 against 1.76): docs/eagle.md.

Every proposal is verified by the target as usual, so the output stays plain
decoding's whatever is proposed. The model drafter keeps its own state across steps
it sits out (an EAGLE head catches up on the features it missed the next time it
drafts).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch

from specserve.spec.base import Drafter, DraftProposal, SequenceView, check_budgets

__all__ = ["HybridDrafter"]


class HybridDrafter:
    """`retrieval` (n-gram or suffix: anything with `lookup(view, k) -> (chain, match
    length)`) where it matches at least `min_match` tokens, `model` otherwise."""

    def __init__(self, retrieval: Any, model: Drafter, min_match: int = 2) -> None:
        if not hasattr(retrieval, "lookup"):
            raise ValueError(f"{retrieval.name} cannot lead a hybrid drafter: it has no lookup")
        if min_match < 1:
            raise ValueError(f"a hybrid drafter needs min_match >= 1, got {min_match}")
        self.retrieval = retrieval
        self.model = model
        self.min_match = min_match
        self.name = f"{retrieval.name}+{model.name}"
        self.wants_hidden = bool(getattr(model, "wants_hidden", False))
        self.feature_layers = tuple(getattr(model, "feature_layers", ()))
        self.copied_steps = 0  # sequence-steps proposed from a strong match alone
        self.model_steps = 0  # sequence-steps the model drafter proposed for

    def take_hidden(self, request_id: str, start: int, rows: torch.Tensor) -> None:
        self.model.take_hidden(request_id, start, rows)

    def pending_rows(self, view: SequenceView) -> int | None:
        """The model drafter's backlog for this sequence, or None where this step would copy
        (a match of `min_match` tokens: the model drafter is not run for it, and neither its
        catch-up nor its call is paid)."""
        if self.retrieval.lookup(view, 1)[1] >= self.min_match:
            return None
        pending = getattr(self.model, "pending_rows", None)
        return pending(view) if pending is not None else 0

    def propose(self, seqs: Seq[SequenceView], budgets: Seq[int]) -> DraftProposal:
        check_budgets(seqs, budgets)
        n = len(seqs)
        tokens: list[list[int]] = [[] for _ in range(n)]
        probs: list[torch.Tensor | None] = [None] * n
        parents: list[list[int] | None] = [None] * n
        confidence: list[list[float] | None] = [None] * n
        model_budgets = [0] * n
        catch_up, catch_up_rows = 0.0, 0
        for i, (view, budget) in enumerate(zip(seqs, budgets)):
            if budget == 0:
                continue
            chain, matched = self.retrieval.lookup(view, budget)
            if chain and matched >= self.min_match:
                tokens[i] = chain[:budget]
                self.copied_steps += 1
            else:
                model_budgets[i] = budget
                self.model_steps += 1
        if any(model_budgets):
            drafted = self.model.propose(seqs, model_budgets)
            catch_up, catch_up_rows = drafted.catch_up_seconds, drafted.catch_up_rows
            for i, budget in enumerate(model_budgets):
                if not budget:
                    continue
                tokens[i], probs[i], parents[i] = drafted.token_ids[i], drafted.probs[i], drafted.parents[i]
                confidence[i] = drafted.confidence[i]
        return DraftProposal(tokens, probs, parents, confidence, catch_up, catch_up_rows)

    def observe(self, seqs: Seq[SequenceView], num_accepted: Seq[int]) -> None:
        self.retrieval.observe(seqs, num_accepted)
        self.model.observe(seqs, num_accepted)

    def release(self, request_id: str) -> None:
        self.retrieval.release(request_id)
        self.model.release(request_id)
