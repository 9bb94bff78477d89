"""Paged KV cache: a pool of fixed-size blocks shared by all sequences, with prefix reuse.

Per layer, keys and values live in one pool `[num_kv_heads, num_blocks * block_size,
head_dim]`. A sequence (identified by a handle, called its slot) owns a block table;
token `i` of the sequence sits at pool index `table[i // B] * B + i % B`. Tokens are
written at their cache index, so appending several tokens is one indexed copy and
rolling speculation back is a length reset (`truncate`), never a copy.

Placement keeps a sequence's blocks consecutive where it can (a new sequence starts in
the middle of the largest free run, and grows into the block after its last one while
that block is free), so attention reads the common case as a strided view of the pool;
scattered tables (shared prefixes, a crowded pool) are read as runs or gathered.

Prefix caching: once a block is full of committed tokens it gets a key chained from the
previous block's key and its own token ids. A new sequence whose leading blocks match
keys in the cache reuses those blocks (reference counted) instead of recomputing them.
Freed blocks with a key stay findable in an LRU list until their memory is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch


class KVCacheFull(RuntimeError):
    """No free slot or block, or a sequence would outgrow the context limit."""


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """Key of a full block: its token ids chained to the key of the block before it."""
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), key=parent, digest_size=16).digest()


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
        block_size: int = 16,
        num_blocks: int | None = None,
    ) -> None:
        """`num_slots` sequences at most, each up to `max_len` tokens, in `num_blocks`
        blocks of `block_size` tokens (default: enough for every slot at `max_len`)."""
        if num_slots <= 0 or max_len <= 0 or block_size <= 0:
            raise ValueError(f"KV cache needs num_slots, max_len, block_size > 0, got {num_slots}, {max_len}, {block_size}")
        self.block_size = block_size
        if num_blocks is None:
            num_blocks = num_slots * -(-max_len // block_size)
        if num_blocks * block_size < max_len:
            raise ValueError(
                f"a KV cache of {num_blocks * block_size} tokens cannot hold one sequence of max_len {max_len}"
            )
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.max_len = max_len
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        self.k: list[torch.Tensor] = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v: list[torch.Tensor] = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths: list[int] = [0] * num_slots  # committed tokens per slot
        self.tables: list[list[int]] = [[] for _ in range(num_slots)]
        self.keys: list[list[bytes]] = [[] for _ in range(num_slots)]  # keys of the slot's full blocks
        self._free_slots: list[int] = list(range(num_slots - 1, -1, -1))
        self._is_free = np.ones(num_blocks, dtype=bool)  # blocks owned by nobody and holding no cached key
        self._num_free_blocks = num_blocks
        self._refs = np.zeros(num_blocks, dtype=np.int32)
        self._key_of: dict[int, bytes] = {}  # block -> key, for cached blocks
        self._block_of: dict[bytes, int] = {}  # key -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with no owner, LRU first
        self.hits = 0  # prompt tokens served from the prefix cache
        self.queries = 0  # prompt tokens looked up

    # ------------------------------------------------------------------ slots

    @property
    def num_free(self) -> int:
        """Free sequence slots."""
        return len(self._free_slots)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence could take now (free ones plus evictable cached ones)."""
        return self._num_free_blocks + len(self._evictable)

    def allocate(self) -> int:
        if not self._free_slots:
            raise KVCacheFull(f"all {self.num_slots} KV cache slots are in use")
        slot = self._free_slots.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free_slots:
            raise ValueError(f"KV slot {slot} freed twice")
        for block in self.tables[slot]:
            self._release_block(block)
        self.tables[slot] = []
        self.keys[slot] = []
        self.lengths[slot] = 0
        self._free_slots.append(slot)

    # ------------------------------------------------------------------ lengths

    def truncate(self, slot: int, length: int) -> None:
        """Roll a slot back to `length` tokens (a length reset; stale entries are overwritten later)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        first = length // self.block_size
        table, keys = self.tables[slot], self.keys[slot]
        for b in range(first, len(keys)):
            block = table[b]
            if self._refs[block] > 1:
                raise ValueError(f"cannot truncate slot {slot} into a shared prefix block")
            if self._key_of.get(block) == keys[b]:  # its tokens will be overwritten: forget the key
                del self._block_of[self._key_of.pop(block)]
        del keys[first:]
        self.lengths[slot] = length

    def reserve(self, slot: int, num_tokens: int) -> int:
        """Make room for `num_tokens` more tokens; return the cache index they start at."""
        start = self.lengths[slot]
        if not self.ensure(slot, start + num_tokens):
            raise KVCacheFull(f"no free KV blocks for {num_tokens} more tokens")
        return start

    def commit(self, slot: int, length: int, token_ids: list[int] | None = None) -> None:
        """Mark `length` tokens of the slot as valid (after a forward wrote them).

        With `token_ids` (the slot's tokens, at least `length`), blocks that became full
        get their prefix key, so later sequences can reuse them.
        """
        if length > self.max_len:
            raise KVCacheFull(f"length {length} exceeds the KV limit {self.max_len}")
        if length > self.capacity(slot):
            raise ValueError(f"slot {slot} has no blocks for {length} tokens")
        self.lengths[slot] = length
        if token_ids is not None:
            self._register(slot, token_ids, length)

    # ------------------------------------------------------------------ blocks

    def ensure(self, slot: int, num_tokens: int) -> bool:
        """Give the slot blocks for its first `num_tokens` tokens; False when the pool is out."""
        if num_tokens > self.max_len:
            raise KVCacheFull(f"sequence needs {num_tokens} KV positions, the limit is {self.max_len}")
        table = self.tables[slot]
        need = -(-num_tokens // self.block_size) - len(table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            table.append(self._take_block(table[-1] + 1 if table else None))
        return True

    def capacity(self, slot: int) -> int:
        """Tokens the slot's blocks hold."""
        return len(self.tables[slot]) * self.block_size

    def blocks_needed(self, slot: int, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(self.tables[slot]))

    def _take_block(self, preferred: int | None) -> int:
        """A block for a growing sequence: `preferred` (the one after its last) when free, so
        the sequence stays one run of the pool; else a free block; else the least recently
        used cached one. A cached block is not taken while free ones remain, not even to stay
        consecutive: after a shared prefix (a system prompt) the next block is often another
        request's cached continuation, and taking it would make every repeated prompt or
        next conversation turn miss the cache past that prefix (attention reads a sequence
        of a few runs nearly as fast as one)."""
        if preferred is not None and preferred < self.num_blocks and self._is_free[preferred]:
            block = preferred
        elif self._num_free_blocks:
            block = self._run_middle()
        else:
            block, _ = self._evictable.popitem(last=False)  # least recently used cached block
            del self._block_of[self._key_of.pop(block)]
            self._refs[block] = 1
            return block
        self._is_free[block] = False
        self._num_free_blocks -= 1
        self._refs[block] = 1
        return block

    def _run_middle(self) -> int:
        """A free block placed for growth: the pool's start if free, else mid largest free run."""
        if self._is_free[0]:
            return 0
        padded = np.concatenate(([False], self._is_free, [False])).astype(np.int8)
        edges = np.diff(padded)
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        i = int(np.argmax(ends - starts))
        return int(starts[i] + (ends[i] - starts[i]) // 2)

    def _release_block(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] > 0:
            return
        if block in self._key_of:
            self._evictable[block] = None  # most recently used at the end
        else:
            self._is_free[block] = True
            self._num_free_blocks += 1

    def _register(self, slot: int, token_ids: list[int], length: int) -> None:
        keys = self.keys[slot]
        table = self.tables[slot]
        B = self.block_size
        for b in range(len(keys), length // B):
            key = block_key(keys[-1] if keys else b"", token_ids[b * B : (b + 1) * B])
            keys.append(key)
            block = table[b]
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key

    def match_prefix(self, slot: int, token_ids: list[int]) -> int:
        """Attach cached blocks matching the leading full blocks of `token_ids` to an
        empty slot; returns how many tokens they cover.

        At least one token is always left to compute (its logits start the decode),
        and a block the new sequence would write into is never shared.
        """
        if self.tables[slot] or self.lengths[slot]:
            raise ValueError(f"slot {slot} is not empty")
        B = self.block_size
        keys: list[bytes] = []
        blocks: list[int] = []
        for b in range((len(token_ids) - 1) // B):
            key = block_key(keys[-1] if keys else b"", token_ids[b * B : (b + 1) * B])
            block = self._block_of.get(key)
            if block is None:
                break
            keys.append(key)
            blocks.append(block)
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        self.tables[slot] = blocks
        self.keys[slot] = keys
        matched = len(blocks) * B
        self.lengths[slot] = matched
        self.queries += len(token_ids)
        self.hits += matched
        return matched

    def move(self, slot: int, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of the slot's positions `src` to positions `dst` in every layer
        (a token tree's accepted branch into consecutive positions). The positions must
        have blocks; moved pairs that coincide are skipped."""
        pairs = [(a, b) for a, b in zip(src, dst, strict=True) if a != b]
        if not pairs:
            return
        index = self.indices_of(slot, [a for a, _ in pairs] + [b for _, b in pairs])
        src_i = torch.tensor(index[: len(pairs)], dtype=torch.long, device=self.device)
        dst_i = torch.tensor(index[len(pairs) :], dtype=torch.long, device=self.device)
        for pool in (*self.k, *self.v):
            pool.index_copy_(1, dst_i, pool.index_select(1, src_i))

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix: unowned cached blocks become free, blocks in use keep
        their data but lose their keys (nothing will match them). Returns the blocks freed."""
        freed = len(self._evictable)
        for block in self._evictable:
            self._is_free[block] = True
        self._num_free_blocks += freed
        self._evictable.clear()
        self._key_of.clear()
        self._block_of.clear()
        return freed

    # ------------------------------------------------------------------ addressing

    def indices(self, slot: int, start: int, end: int) -> list[int]:
        """Pool indices of the slot's tokens `start..end-1` (their blocks must exist)."""
        return self.indices_of(slot, range(start, end))

    def indices_of(self, slot: int, positions: Iterable[int]) -> list[int]:
        """Pool indices of the slot's tokens at `positions` (their blocks must exist)."""
        B = self.block_size
        table = self.tables[slot]
        return [table[i // B] * B + i % B for i in positions]

    def runs(self, slot: int, end: int) -> list[tuple[int, int]]:
        """The slot's tokens `0..end-1` as runs of consecutive pool indices: (first index, count)."""
        B = self.block_size
        table = self.tables[slot]
        out: list[tuple[int, int]] = []
        for b in range(-(-end // B)):
            first, n = table[b] * B, min(B, end - b * B)
            if out and out[-1][0] + out[-1][1] == first:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((first, n))
        return out

    def contiguous_start(self, slot: int, end: int) -> int | None:
        """Pool index of token 0 when tokens `0..end-1` are consecutive in the pool, else None."""
        n = -(-end // self.block_size)
        table = self.tables[slot]
        if n == 0:
            return 0
        first = table[0]
        if table[n - 1] - first != n - 1:
            return None
        if n > 2 and any(table[i] != first + i for i in range(1, n - 1)):
            return None
        return first * self.block_size

    # ------------------------------------------------------------------ accounting

    def usage(self) -> float:
        """Share of the KV blocks held by live sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def token_bytes(self) -> int:
        """KV bytes per token over all layers."""
        return self.memory_bytes() // (self.num_blocks * self.block_size)
