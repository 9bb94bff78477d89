"""Builds one flattened, ragged forward over the batch and returns the logits (or the
greedy tokens) of the rows asked for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specserve.cache.kv_cache import KVCache, KVCacheFull
from specserve.model.layers import build_attention_metadata
from specserve.model.transformer import DecoderModel


@dataclass
class ForwardItem:
    """The tokens one sequence contributes to a forward."""

    slot: int
    cache_start: int  # tokens of this sequence already in the KV cache
    token_ids: list[int]
    positions: list[int] | None = None  # None = cache_start, cache_start+1, ... (a chain)
    tree_mask: torch.Tensor | None = None  # [n, n] bool, for token trees
    logits_from: int = -1  # logits (or greedy tokens) for tokens[logits_from:]; -1 = last only; None = none


class ModelRunner:
    def __init__(self, model: DecoderModel, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        cfg = model.config
        self.sliding_window = cfg.sliding_window if any(cfg.sliding_layers) else None

    @torch.inference_mode()
    def forward(
        self,
        items: list[ForwardItem],
        layer_mask: list[bool] | None = None,
        all_hidden: bool = False,
        greedy: bool = False,
        feature_layers: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the target over all items; K/V land in the cache at each item's cache_start.

        Returns (logits `[R, vocab]` fp32, hidden `[R, hidden]`) for the requested rows,
        in item order; with `all_hidden`, hidden holds every token's row `[T, hidden]`
        (a trained drafter reads the target's features). With `greedy` the first value is
        each requested row's argmax token `[R]` int64 instead of its logits
        (`DecoderModel.greedy_tokens`: the native head computes them without writing
        logits). With `feature_layers` (and `all_hidden`), each hidden row is followed by
        the outputs of those target layers, `[T, hidden * (1 + len(feature_layers))]`: the
        features of an EAGLE head that reads several layers. The caller commits cache lengths
        once it knows what was accepted.
        """
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        for item in items:
            n = len(item.token_ids)
            if not self.cache.ensure(item.slot, item.cache_start + n):
                raise KVCacheFull(f"no free KV blocks for {item.cache_start + n} tokens of slot {item.slot}")
            base = len(ids)
            ids.extend(item.token_ids)
            positions.extend(item.positions if item.positions is not None else range(item.cache_start, item.cache_start + n))
            if item.logits_from is not None:
                start = n - 1 if item.logits_from == -1 else item.logits_from
                rows.extend(range(base + start, base + n))
        meta = build_attention_metadata(
            self.cache,
            [it.slot for it in items],
            [len(it.token_ids) for it in items],
            [it.cache_start for it in items],
            self.device,
            self.sliding_window,
            [it.tree_mask for it in items] if any(it.tree_mask is not None for it in items) else None,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        taps: dict[int, torch.Tensor | None] | None = None
        if all_hidden and feature_layers:
            taps = dict.fromkeys(feature_layers)
        hidden = self.model(input_ids, pos, meta, self.cache, layer_mask, taps)
        head = self.model.greedy_tokens if greedy else self.model.compute_logits
        if len(rows) == len(ids):
            out = head(hidden)
        else:
            picked = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]
            out = head(picked)
            if not all_hidden:
                return out, picked
        if taps:
            missing = [i for i, t in taps.items() if t is None]
            if missing:
                raise ValueError(f"feature layers {missing} did not run (skipped or past the model's layers)")
            hidden = torch.cat([hidden, *(taps[i].to(hidden.dtype) for i in feature_layers)], dim=-1)
        return out, hidden
