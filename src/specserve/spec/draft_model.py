"""A smaller model with the target's tokenizer drafts chains (`draft-model:PATH`).

It keeps its own KV cache (one slot per request). Before drafting, the tokens the
target accepted since the last step are fed to catch the cache up; after verification
the cache is rolled back to the accepted prefix by a length reset.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from specserve.cache.kv_cache import KVCache
from specserve.engine.runner import ForwardItem, ModelRunner
from specserve.model import native
from specserve.model.loader import build_model, read_checkpoint
from specserve.spec.autoregressive import draft_chains
from specserve.spec.base import DraftProposal, SequenceView


def check_same_vocabulary(target_tokenizer, draft_tokenizer, target_vocab: int, draft_vocab: int, path: str) -> None:
    if draft_vocab != target_vocab:
        raise ValueError(
            f"draft model {path} has a vocabulary of {draft_vocab} tokens; the target has {target_vocab}: "
            "a draft model must share the target's tokenizer"
        )
    if target_tokenizer is None or draft_tokenizer is None:
        return
    step = max(1, target_vocab // 997)
    ids = list(range(0, min(target_vocab, draft_tokenizer.vocab_size), step))
    if target_tokenizer.convert_ids_to_tokens(ids) != draft_tokenizer.convert_ids_to_tokens(ids):
        raise ValueError(f"draft model {path} uses a different tokenizer than the target")


class DraftModelDrafter:
    name = "draft-model"

    def __init__(
        self,
        path: str,
        target_vocab_size: int,
        target_tokenizer,
        dtype: torch.dtype,
        device: torch.device,
        num_slots: int,
        max_len: int,
    ) -> None:
        checkpoint = read_checkpoint(path)  # raises FileNotFoundError for a missing path
        check_same_vocabulary(
            target_tokenizer, checkpoint.tokenizer, target_vocab_size, checkpoint.config.vocab_size, path
        )
        cfg = checkpoint.config
        self.path = path
        self.model = build_model(cfg, checkpoint.tensors, dtype, device, max_len)
        cache = KVCache(
            cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim, native.kv_dtype(self.model), device
        )
        self.runner = ModelRunner(self.model, cache)
        self.cache = cache
        self._slots: dict[str, int] = {}

    def _slot(self, request_id: str) -> int:
        slot = self._slots.get(request_id)
        if slot is None:
            slot = self._slots[request_id] = self.cache.allocate()
        return slot

    def propose(self, seqs: Seq[SequenceView], budgets: Seq[int]) -> DraftProposal:
        first: list[ForwardItem | None] = []
        for seq, budget in zip(seqs, budgets):
            if budget <= 0:
                first.append(None)
                continue
            slot = self._slot(seq.request_id)
            cached = min(self.cache.lengths[slot], len(seq.token_ids) - 1)
            first.append(ForwardItem(slot, cached, seq.token_ids[cached:]))
        proposal = draft_chains(self.runner, seqs, budgets, first)
        for seq, item, drafted in zip(seqs, first, proposal.token_ids):
            if item is not None:
                # the cache now holds the sequence and all drafts but the last
                self.cache.commit(item.slot, len(seq.token_ids) + len(drafted) - 1)
        return proposal

    def observe(self, seqs: Seq[SequenceView], num_accepted: Seq[int]) -> None:
        for seq in seqs:
            slot = self._slots.get(seq.request_id)
            if slot is not None:
                # valid: everything before the newest (bonus/recovered) token
                self.cache.truncate(slot, min(self.cache.lengths[slot], len(seq.token_ids) - 1))

    def release(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self.cache.free(slot)
