"""Drafters built from a spec string, and the measured forward-cost table the load-aware
policy plans with."""

from __future__ import annotations

import time

import numpy as np
import torch

from specserve.cache.kv_cache import KVCache
from specserve.engine.runner import ForwardItem, ModelRunner
from specserve.spec.base import Drafter
from specserve.spec.names import SPEC_METHODS, hybrid_error, split_hybrid
from specserve.spec.policy import ForwardCost


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
    lead, rest = split_hybrid(spec)
    if lead is not None:
        why = hybrid_error(spec)
        if why is not None:
            raise ValueError(f"spec: {why}")
        from specserve.spec.hybrid import HybridDrafter

        return HybridDrafter(
            make_drafter(lead, runner, tokenizer, num_spec_tokens, num_slots),
            make_drafter(rest, runner, tokenizer, num_spec_tokens, num_slots),
        )
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
    if name == "eagle":
        from specserve.spec.eagle import DEFAULT_EAGLE, EagleDrafter, load_head
        from specserve.spec.heads import head_dir

        head = load_head(head_dir("eagle", arg, DEFAULT_EAGLE), model)
        return EagleDrafter(head, runner.cache.num_slots, runner.cache.max_len)
    if name == "medusa":
        from specserve.spec.heads import head_dir
        from specserve.spec.medusa import DEFAULT_MEDUSA, MedusaDrafter
        from specserve.spec.medusa import load_head as load_medusa

        return MedusaDrafter(load_medusa(head_dir("medusa", arg, DEFAULT_MEDUSA), model))
    raise ValueError(f"unknown spec {spec!r}; choose one of {', '.join(SPEC_METHODS)}")


@torch.inference_mode()
def timed_forwards(
    runner: ModelRunner, items: list[ForwardItem], reps: int, greedy: bool = False, warm_up: bool = True
) -> list[float]:
    """Seconds of `reps` forwards of `items` after one untimed (none with `warm_up` False;
    nothing is committed, so every forward writes the same cache entries); with `greedy`,
    the rows' greedy tokens in place of their logits (`ModelRunner.forward`)."""
    device = runner.device
    times = []
    for _ in range(reps + int(warm_up)):
        t0 = time.perf_counter()
        runner.forward(items, greedy=greedy)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times[int(warm_up):]


@torch.inference_mode()
def measure_forward_cost(
    runner: ModelRunner,
    max_seqs: int,
    max_tokens: int,
    context: int = 128,
    reps: int = 2,
    far_context: int = 1024,
    pairs: int = 5,
) -> ForwardCost:
    """Target forward time by batch shape (best of `reps` after a warm-up), for up to
    `max_seqs` sequences of up to `max_tokens` tokens each, every row's greedy token
    computed as greedy verification takes them (a sampled step's logits cost a little more
    per row; the policy's measured scale takes the difference in).

    Measured on a scratch cache whose sequences hold `context` zeroed tokens each, at
    sequence counts 1, 2, 4, ... and token counts 1, 2, 3, 5, 9, ... (1 + a power of 2).
    Each sequence count is also measured with one sequence holding a second token (the
    table's `one_more`: a step's first draft costs more than the mean row), as the median
    difference of `pairs` forwards with and without it, alternated: the difference is a
    few milliseconds, within what a shared machine's load moves a best-of-2. The largest
    token count of (up to) 4 sequences is measured again over `far_context` cached tokens:
    the difference per row and per key is the table's `per_row_key` (attention grows with
    the context).
    """
    model = runner.model
    cfg = model.config
    max_tokens = max(1, min(max_tokens, model.max_len - 2))  # a small context limit caps the probe
    context = max(1, min(context, model.max_len - max_tokens - 1))
    far_context = max(context, min(far_context, model.max_len - max_tokens - 1))
    seqs = sorted({1 << i for i in range(max_seqs.bit_length()) if 1 << i <= min(max_seqs, 32)})
    tokens = sorted({1} | {1 + (1 << i) for i in range(max_tokens.bit_length()) if 1 + (1 << i) <= max_tokens} | {max_tokens})
    kv = runner.cache.k[0]

    def scratch_batch(num: int, start: int) -> tuple[ModelRunner, list[int]]:
        scratch = KVCache(cfg.num_layers, num, start + max_tokens, cfg.num_kv_heads, cfg.head_dim, kv.dtype, kv.device)
        for t in (*scratch.k, *scratch.v):
            t.zero_()
        slots = [scratch.allocate() for _ in range(num)]
        for slot in slots:
            scratch.ensure(slot, start + max_tokens)
            scratch.commit(slot, start)
        return ModelRunner(model, scratch), slots

    def items(slots: list[int], s: int, n: int, start: int, more: int = 0) -> list[ForwardItem]:
        return [ForwardItem(slot, start, [1] * (n + (more if i == 0 else 0)), logits_from=0)
                for i, slot in enumerate(slots[:s])]

    def best(batch: tuple[ModelRunner, list[int]], s: int, n: int, start: int) -> float:
        probe, slots = batch
        return min(timed_forwards(probe, items(slots, s, n, start), reps, greedy=True))

    def extra_row(batch: tuple[ModelRunner, list[int]], s: int) -> float:
        probe, slots = batch
        plain, more = items(slots, s, 1, context), items(slots, s, 1, context, more=1)
        timed_forwards(probe, more, 0, greedy=True)  # this shape's warm-up (the table's warmed `plain`)

        def once(batch_items: list[ForwardItem]) -> float:
            return timed_forwards(probe, batch_items, 1, greedy=True, warm_up=False)[0]

        diffs = [once(more) - once(plain) for _ in range(pairs)]
        return max(float(np.median(diffs)), 0.0)

    near = scratch_batch(seqs[-1], context)
    table = [tuple(best(near, s, n, context) for n in tokens) for s in seqs]
    one_more = None
    if max_tokens > 1 and pairs > 0:
        one_more = tuple(row[0] + extra_row(near, s) for s, row in zip(seqs, table))
    del near
    per_row_key = 0.0
    if far_context > context:
        i = max(i for i, s in enumerate(seqs) if s <= 4)
        far = best(scratch_batch(seqs[i], far_context), seqs[i], tokens[-1], far_context)
        rows = seqs[i] * tokens[-1]
        per_row_key = max(0.0, (far - table[i][-1]) / (rows * (far_context - context)))
    return ForwardCost(tuple(seqs), tuple(tokens), tuple(table), context, per_row_key, one_more)
