"""Self-speculation: the target with a subset of its layers skipped drafts chains
(Draft & Verify / SWIFT / LayerSkip style), sharing the target's weights and KV cache.

Drafting writes K/V of the kept layers at the draft positions of the target's cache;
the verification forward rewrites those positions with the full model before anyone
reads them, and skipped layers are never read by the draft. No extra memory.

The skip set comes from a calibration on text that is not benchmark data: one forward
measures how much each layer changes the residual stream; the layers that change it
least are candidates, and the number skipped is chosen by the draft/target top-1
agreement it keeps against the draft's cost.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from specserve.cache.kv_cache import KVCache
from specserve.engine.runner import ForwardItem, ModelRunner
from specserve.model.layers import build_attention_metadata
from specserve.spec.autoregressive import draft_chains
from specserve.spec.base import DraftProposal, SequenceView

# calibration text: plain prose written for this purpose (never benchmark questions)
CALIBRATION_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
    "polished the great lens and wrote the weather in a leather notebook: wind from the west, "
    "light rain, a fishing boat returning late. Over forty years the notebook grew into a shelf of "
    "volumes, and the village came to rely on them. When the harbour was rebuilt, engineers read "
    "his notes to learn how storms had moved the sand. A simple habit, kept with care, became a "
    "record that no instrument had made. Good tools help, but steady attention matters more. "
    "To make bread, mix flour, water, salt and yeast; knead the dough for ten minutes, let it rise "
    "for an hour, shape it, and bake it in a hot oven until the crust is brown. "
    "def mean(values):\n    return sum(values) / len(values)\n"
)


class LayerSkipDrafter:
    name = "layer-skip"

    def __init__(self, runner: ModelRunner, skip: Seq[int] | None = None, tokenizer=None) -> None:
        self.runner = runner
        n = runner.model.config.num_layers
        if skip is None:
            if tokenizer is None:
                raise ValueError("layer-skip needs a tokenizer for calibration, or an explicit skip set")
            skip = calibrate_skip_set(runner, tokenizer.encode(CALIBRATION_TEXT))
        bad = [i for i in skip if not 0 <= i < n]
        if bad:
            raise ValueError(f"layer-skip: layers {bad} do not exist (the target has {n})")
        if len(set(skip)) >= n:
            raise ValueError("layer-skip cannot skip every layer")
        self.skip = sorted(set(skip))
        self.layer_mask = [i not in self.skip for i in range(n)]

    def propose(self, seqs: Seq[SequenceView], budgets: Seq[int]) -> DraftProposal:
        first = [
            ForwardItem(s.slot, len(s.token_ids) - 1, [s.token_ids[-1]]) if b > 0 else None
            for s, b in zip(seqs, budgets)
        ]
        return draft_chains(self.runner, seqs, budgets, first, self.layer_mask)

    def observe(self, seqs: Seq[SequenceView], num_accepted: Seq[int]) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass


@torch.inference_mode()
def calibrate_skip_set(runner: ModelRunner, ids: list[int], k: int = 4) -> list[int]:
    """Pick the layers to skip from one teacher-forced pass over `ids`."""
    model = runner.model
    cfg = model.config
    n_layers = cfg.num_layers
    device = runner.device
    cache = KVCache(n_layers, 1, len(ids) + 1, cfg.num_kv_heads, cfg.head_dim, runner.cache.k[0].dtype, device)
    slot = cache.allocate()
    window = cfg.sliding_window if any(cfg.sliding_layers) else None
    cache.ensure(slot, len(ids))
    meta = build_attention_metadata(cache, [slot], [len(ids)], [0], device, window)
    input_ids = torch.tensor(ids, device=device)
    positions = torch.arange(len(ids), device=device)

    def run(mask: list[bool] | None) -> torch.Tensor:
        return model.greedy_tokens(model(input_ids, positions, meta, cache, mask))  # [T]

    # importance: relative change of the residual stream made by each layer
    x = model.embed_tokens(input_ids)
    if cfg.embed_scale is not None:
        x = x * cfg.embed_scale
    cos, sin = model.rope.lookup(positions, x.dtype)
    importance = []
    for i, layer in enumerate(model.layers):
        if model.local_rope is not None and layer.self_attn.sliding:
            c, s = model.local_rope.lookup(positions, x.dtype)
        else:
            c, s = cos, sin
        y = layer(x, c, s, meta, cache.k[i], cache.v[i])
        importance.append(((y - x).float().norm() / x.float().norm().clamp_min(1e-6)).item())
        x = y
    # never skip the first or last layers: they carry the most model-specific work
    protected = {0, 1, n_layers - 1}
    order = [i for i in sorted(range(n_layers), key=lambda i: importance[i]) if i not in protected]
    reference = run(None)
    best, best_rate = [], 0.0
    for frac in (0.25, 0.35, 0.45, 0.55):
        skip = sorted(order[: max(1, int(frac * n_layers))])
        mask = [i not in skip for i in range(n_layers)]
        agree = (run(mask) == reference).float().mean().item()
        a = min(agree, 0.99)
        draft_cost = 1 - len(skip) / n_layers
        # tokens per unit cost for k drafts (verification ~ one forward)
        rate = (1 - a ** (k + 1)) / (1 - a) / (1 + k * draft_cost)
        if rate > best_rate:
            best, best_rate = skip, rate
    return best
