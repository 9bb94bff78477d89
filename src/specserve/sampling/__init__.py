"""Sampling layer: request parameters, logits processing and token sampling."""

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
from .params import MAX_LOGPROBS, SamplingParams
from .sampler import Logprobs, compute_logprobs, make_generator, sample

__all__ = [
    "MAX_LOGPROBS",
    "Logprobs",
    "ProcessedLogits",
    "SamplingParams",
    "SamplingTensors",
    "apply_penalties",
    "build_token_counts",
    "build_token_mask",
    "compute_logprobs",
    "draft_token_counts",
    "logits_to_probs",
    "make_generator",
    "process",
    "process_batch",
    "sample",
]
