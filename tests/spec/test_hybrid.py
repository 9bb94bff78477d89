"""Hybrid drafting (ngram/suffix first, a model drafter otherwise): which drafter proposes
for which sequence, the match lengths the copying drafters report and the spec names.
Its losslessness is checked with the other drafters': with the packaged EAGLE head greedy
batched and seeded sampling (test_eagle), on Spec-Bench (test_spec_equivalence), staggered
under batching (tests/engine/test_batching) and by the sampling distribution
(test_spec_sampling, with a draft model)."""

from __future__ import annotations

import pytest

from specserve.spec.base import DraftProposal
from specserve.spec.hybrid import HybridDrafter
from specserve.spec.ngram import NgramDrafter
from specserve.spec.suffix import SuffixDrafter
from tests.spec.views import view


class FakeModelDrafter:
    """Proposes a fixed tree for every sequence it is asked about; records the calls."""

    name = "fake"

    def __init__(self) -> None:
        self.asked: list[list[int]] = []
        self.observed = self.released = 0

    def propose(self, seqs, budgets):
        self.asked.append(list(budgets))
        tokens = [[90, 91, 92][:b] for b in budgets]
        return DraftProposal(tokens, parents=[[-1, -1, 0][:b] if b else None for b in budgets])

    def observe(self, seqs, num_accepted):
        self.observed += 1

    def release(self, request_id):
        self.released += 1


REPEATS = [5, 6, 7, 8, 1, 2, 5, 6]  # "5 6" recurs: a 2-token match, continued by 7 8 1 2 ...
FRESH = [10, 11, 12, 13]  # nothing recurs


def test_a_two_token_match_copies_and_skips_the_model():
    model = FakeModelDrafter()
    hybrid = HybridDrafter(NgramDrafter(), model)
    out = hybrid.propose([view("a", REPEATS), view("b", FRESH)], [4, 3])
    assert out.token_ids[0] == [7, 8, 1, 2] and out.parents[0] is None  # the copy, a chain
    assert out.token_ids[1] == [90, 91, 92] and out.parents[1] == [-1, -1, 0]  # the model's tree
    assert model.asked == [[0, 3]]  # the copying sequence is not drafted by the model
    assert (hybrid.copied_steps, hybrid.model_steps) == (1, 1)


def test_a_weak_match_goes_to_the_model_and_zero_budgets_to_neither():
    model = FakeModelDrafter()
    hybrid = HybridDrafter(NgramDrafter(), model)
    one = [5, 6, 7, 8, 5]  # only "5" recurs: a 1-token match
    out = hybrid.propose([view("a", one), view("b", REPEATS)], [3, 0])
    assert out.token_ids == [[90, 91, 92], []]
    assert model.asked == [[3, 0]]
    hybrid.propose([view("b", REPEATS)], [0])
    assert model.asked == [[3, 0]]  # nothing to draft: the model is not called
    hybrid.observe([view("a", one)], [1])
    hybrid.release("a")
    assert (model.observed, model.released) == (1, 1)


def test_lookup_reports_the_match_length():
    ngram = NgramDrafter()
    assert ngram.lookup(view("a", REPEATS), 3) == ([7, 8, 1], 2)
    assert ngram.lookup(view("b", FRESH), 3) == ([], 0)
    assert ngram.lookup(view("a", REPEATS), 0) == ([], 0)
    suffix = SuffixDrafter()
    chain, matched = suffix.lookup(view("c", REPEATS * 2), 8)
    assert matched >= 2 and chain == suffix.propose([view("c", REPEATS * 2)], [8]).token_ids[0]


def test_a_retrieval_drafter_without_lookup_is_refused():
    with pytest.raises(ValueError, match="no lookup"):
        HybridDrafter(FakeModelDrafter(), FakeModelDrafter())
    with pytest.raises(ValueError, match="min_match"):
        HybridDrafter(NgramDrafter(), FakeModelDrafter(), min_match=0)


@pytest.mark.parametrize("spec", ["ngram+ngram", "ngram+suffix", "ngram+suffix+eagle", "suffix+bogus"])
def test_bad_hybrid_specs_are_refused(llm_fp32, spec):
    with pytest.raises(ValueError):
        llm_fp32.set_spec(spec)
    llm_fp32.set_spec(None)


def test_hybrid_default_draft_length_is_the_model_drafters(llm_fp32):
    llm_fp32.set_spec("ngram+eagle", None, False)  # no load-aware policy: no forward cost to measure
    try:
        assert llm_fp32.num_spec_tokens == 10
        assert llm_fp32.engine.drafter.name == "ngram+eagle"
        assert isinstance(llm_fp32.engine.drafter.retrieval, NgramDrafter)
    finally:
        llm_fp32.set_spec(None)
