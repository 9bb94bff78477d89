"""Speculative decoding: drafters behind one protocol, and the draft-length policy."""

from __future__ import annotations

import time

import torch

from specserve.cache.kv_cache import KVCache
from specserve.engine.runner import ForwardItem, ModelRunner
from specserve.spec.base import DraftProposal, Drafter, SequenceView
from specserve.spec.policy import AdaptiveSpecPolicy, FixedSpecPolicy, SpecPolicy

SPEC_METHODS = ("ngram", "suffix", "draft-model:PATH", "layer-skip[:L1,L2,...]")

__all__ = [
    "DraftProposal",
    "Drafter",
    "SequenceView",
    "SpecPolicy",
    "AdaptiveSpecPolicy",
    "FixedSpecPolicy",
    "SPEC_METHODS",
    "make_drafter",
    "measure_forward_cost",
]


def make_drafter(
    spec: str,
    runner: ModelRunner,
    tokenizer,
    num_spec_tokens: int,
    num_slots: int,
) -> Drafter:
    """Build the drafter named by `spec`; any problem is an error here, at start-up."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec must be one of {', '.join(SPEC_METHODS)}, got {spec!r}")
    name, _, arg = spec.partition(":")
    model = runner.model
    if name == "ngram" and not arg:
        from specserve.spec.ngram import NgramDrafter

        return NgramDrafter(num_spec_tokens=num_spec_tokens)
    if name == "suffix" and not arg:
        from specserve.spec.suffix import SuffixDrafter

        return SuffixDrafter(num_spec_tokens=max(num_spec_tokens, 1))
    if name == "draft-model":
        if not arg:
            raise ValueError("spec 'draft-model' needs a path: draft-model:PATH")
        from specserve.spec.draft_model import DraftModelDrafter

        return DraftModelDrafter(
            arg, model.config.vocab_size, tokenizer, model.dtype, model.device, num_slots, runner.cache.max_len
        )
    if name == "layer-skip":
        from specserve.spec.layer_skip import LayerSkipDrafter

        skip = None
        if arg:
            try:
                skip = [int(x) for x in arg.split(",")]
            except ValueError as exc:
                raise ValueError(f"layer-skip takes a comma-separated list of layer indices, got {arg!r}") from exc
        return LayerSkipDrafter(runner, skip, tokenizer)
    raise ValueError(f"unknown spec {spec!r}; choose one of {', '.join(SPEC_METHODS)}")


@torch.inference_mode()
def measure_forward_cost(runner: ModelRunner, max_tokens: int, context: int = 128, reps: int = 3) -> list[float]:
    """Target forward time (seconds, median of `reps`) for 1..max_tokens new tokens.

    Measured at a few sizes on a scratch cache and interpolated linearly.
    """
    model = runner.model
    cfg = model.config
    max_tokens = max(1, min(max_tokens, model.max_len - 2))  # a small context limit caps the probe
    context = max(1, min(context, model.max_len - max_tokens - 1))
    kv = runner.cache.k[0]
    scratch = KVCache(cfg.num_layers, 1, context + max_tokens + 1, cfg.num_kv_heads, cfg.head_dim, kv.dtype, kv.device)
    probe = ModelRunner(model, scratch)
    slot = scratch.allocate()
    probe.forward([ForwardItem(slot, 0, [1] * context)])
    sizes = sorted({1 << i for i in range(max_tokens.bit_length()) if 1 << i <= max_tokens} | {max_tokens})
    measured: dict[int, float] = {}
    for n in sizes:
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            probe.forward([ForwardItem(slot, context, [1] * n)])
            times.append(time.perf_counter() - t0)
        measured[n] = sorted(times[1:])[len(times[1:]) // 2]
    costs = []
    for n in range(1, max_tokens + 1):
        lo = max(s for s in sizes if s <= n)
        hi = min(s for s in sizes if s >= n)
        w = 0.0 if hi == lo else (n - lo) / (hi - lo)
        costs.append(measured[lo] * (1 - w) + measured[hi] * w)
    return costs
