"""Preallocated, position-indexed KV cache with one slot per sequence.

Each sequence owns a slot: a `[num_kv_heads, max_len, head_dim]` region per layer for
keys and one for values. Tokens are written at their cache index, so appending several
tokens is one copy and rolling back speculation is a length reset (`truncate`), never a
copy of the cache.
"""

from __future__ import annotations

import torch


class KVCacheFull(RuntimeError):
    """No free slot, or a sequence would outgrow its slot."""


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_slots <= 0 or max_len <= 0:
            raise ValueError(f"KV cache needs num_slots > 0 and max_len > 0, got {num_slots}, {max_len}")
        self.num_slots = num_slots
        self.max_len = max_len
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        # one tensor per layer so a layer indexes its own storage without a 5-D slice
        self.k: list[torch.Tensor] = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # [S, Hkv, L, D]
        self.v: list[torch.Tensor] = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]  # [S, Hkv, L, D]
        self.lengths: list[int] = [0] * num_slots  # committed tokens per slot
        self._free: list[int] = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise KVCacheFull(f"all {self.num_slots} KV cache slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"KV slot {slot} freed twice")
        self.lengths[slot] = 0
        self._free.append(slot)

    def truncate(self, slot: int, length: int) -> None:
        """Roll a slot back to `length` tokens (a length reset; stale entries are overwritten later)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def reserve(self, slot: int, num_tokens: int) -> int:
        """Check room for `num_tokens` more tokens; return the cache index they start at."""
        start = self.lengths[slot]
        if start + num_tokens > self.max_len:
            raise KVCacheFull(f"sequence needs {start + num_tokens} KV positions, the limit is {self.max_len}")
        return start

    def commit(self, slot: int, length: int) -> None:
        """Mark `length` tokens of the slot as valid (after a forward wrote them)."""
        if length > self.max_len:
            raise KVCacheFull(f"length {length} exceeds the KV limit {self.max_len}")
        self.lengths[slot] = length

    def usage(self) -> float:
        """Share of the KV capacity held by sequences (0..1)."""
        return 1.0 - self.num_free / self.num_slots

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
