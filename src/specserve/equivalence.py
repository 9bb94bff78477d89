"""Greedy equivalence with near-tie reporting (the correctness contract).

A candidate output (speculative, batched, ...) must equal the plain greedy reference.
The only admissible divergence is a numerical near-tie: at the first differing
position, the reference's top-2 logits differ by less than a small tolerance. The
reference run requests `logprobs=2`; log-softmax keeps logit differences, so the gap
between its top-2 logprobs is the top-2 logit margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specserve.engine.sequence import TokenLogprob

# top-2 logit margin under which a divergence counts as a numerical near-tie. bf16 logits
# come out of a bf16 matmul: at the magnitudes of top logits (16-32) one bf16 step is
# 0.125, and a verify forward over k+1 tokens may round a few steps differently from a
# one-token forward; 0.5 is four such steps. fp32 keeps ~1e-5 noise: 1e-3 is ample.
NEAR_TIE = {torch.float32: 1e-3, torch.bfloat16: 0.5}


def bit_exact(llm) -> bool:
    """Whether `llm`'s greedy outputs are the same tokens however a request is computed
    (alone, batched, speculated, after a prefix-cache hit or a preemption), so that a
    candidate must be identical, not merely equal up to near-ties: fp32, and bf16 on
    the row-invariant native layers (specserve.model.native)."""
    return llm.dtype == torch.float32 or getattr(llm.model, "native", None) is not None


@dataclass(frozen=True)
class Divergence:
    index: int | None  # first differing position; None = identical
    margin: float | None  # reference top-2 logit margin there (None when unknown/identical)
    tolerance: float

    @property
    def identical(self) -> bool:
        return self.index is None

    @property
    def near_tie(self) -> bool:
        return self.margin is not None and self.margin < self.tolerance

    @property
    def ok(self) -> bool:
        return self.identical or self.near_tie

    def describe(self) -> str:
        if self.identical:
            return "identical"
        kind = "near-tie" if self.near_tie else "NOT a near-tie"
        margin = "unknown" if self.margin is None else f"{self.margin:.4g}"
        return f"diverges at token {self.index}, top-2 logit margin {margin} ({kind}, tolerance {self.tolerance:g})"


def first_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int | None:
    """The first index where the two differ (a length difference counts), None when equal."""
    for i, (a, b) in enumerate(zip(reference, candidate)):
        if a != b:
            return i
    return None if len(reference) == len(candidate) else min(len(reference), len(candidate))


def compare_greedy(
    reference: list[int],
    reference_logprobs: list[TokenLogprob],
    candidate: list[int],
    dtype: torch.dtype,
) -> Divergence:
    """Compare a candidate with the plain greedy reference (run with logprobs >= 2)."""
    tolerance = NEAR_TIE.get(dtype, NEAR_TIE[torch.bfloat16])
    index = first_divergence(reference, candidate)
    margin = None
    if index is not None and index < len(reference_logprobs):
        top = reference_logprobs[index].top
        if len(top) >= 2:
            margin = top[0][1] - top[1][1]
    return Divergence(index, margin, tolerance)
