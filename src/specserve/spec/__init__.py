"""Speculative decoding: drafters behind one protocol, and the draft-length policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from specserve.lazy import lazy_attributes
from specserve.spec.names import RETRIEVAL, SPEC_METHODS, hybrid_error, split_hybrid

if TYPE_CHECKING:
    from specserve.spec.base import Drafter, DraftProposal, SequenceView
    from specserve.spec.factory import make_drafter, measure_forward_cost, timed_forwards
    from specserve.spec.policy import AdaptiveSpecPolicy, FixedSpecPolicy, ForwardCost, SpecPolicy

__all__ = [
    "RETRIEVAL",
    "SPEC_METHODS",
    "AdaptiveSpecPolicy",
    "DraftProposal",
    "Drafter",
    "FixedSpecPolicy",
    "ForwardCost",
    "SequenceView",
    "SpecPolicy",
    "make_drafter",
    "hybrid_error",
    "measure_forward_cost",
    "split_hybrid",
    "timed_forwards",
]

# the PyTorch parts load on first use: the CLI checks `--spec` without PyTorch
__getattr__, __dir__ = lazy_attributes(
    globals(),
    {
        **dict.fromkeys(("Drafter", "DraftProposal", "SequenceView"), "specserve.spec.base"),
        **dict.fromkeys(("make_drafter", "measure_forward_cost", "timed_forwards"), "specserve.spec.factory"),
        **dict.fromkeys(("AdaptiveSpecPolicy", "FixedSpecPolicy", "ForwardCost", "SpecPolicy"), "specserve.spec.policy"),
    },
)
