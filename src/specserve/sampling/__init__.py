"""Sampling layer: request parameters, logits processing and token sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

from specserve.lazy import lazy_attributes

from .params import MAX_LOGPROBS, SamplingParams

if TYPE_CHECKING:
    from .logits import (
        ProcessedLogits,
        SamplingTensors,
        apply_penalties,
        build_token_counts,
        build_token_mask,
        draft_token_counts,
        logits_to_probs,
        process,
        process_batch,
    )
    from .sampler import Logprobs, compute_logprobs, make_generator, sample

_TORCH_PARTS = {
    "specserve.sampling.logits": (
        "ProcessedLogits",
        "SamplingTensors",
        "apply_penalties",
        "build_token_counts",
        "build_token_mask",
        "draft_token_counts",
        "logits_to_probs",
        "process",
        "process_batch",
    ),
    "specserve.sampling.sampler": ("Logprobs", "compute_logprobs", "make_generator", "sample"),
}

__all__ = ["MAX_LOGPROBS", "SamplingParams", *(name for names in _TORCH_PARTS.values() for name in names)]

# the PyTorch parts load on first use: the CLI validates SamplingParams without PyTorch
__getattr__, __dir__ = lazy_attributes(globals(), {n: m for m, names in _TORCH_PARTS.items() for n in names})
