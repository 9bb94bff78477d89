"""The paged KV cache: block placement, prefix sharing, and how attention reads a sequence
(one view, a few concatenated runs, or a gather) - all three give the same attention."""

from __future__ import annotations

import torch

from specserve.cache.kv_cache import KVCache
from specserve.config import ModelConfig
from specserve.model import layers
from specserve.model.layers import Attention, build_attention_metadata

B = 16


def cache(num_blocks: int = 32, slots: int = 4) -> KVCache:
    return KVCache(1, slots, num_blocks * B, 1, 4, torch.float32, "cpu", block_size=B, num_blocks=num_blocks)


def committed(kv: KVCache, tokens: list[int]) -> int:
    """A new slot holding `tokens`, its full blocks registered in the prefix cache."""
    slot = kv.allocate()
    assert kv.ensure(slot, len(tokens))
    kv.commit(slot, len(tokens), tokens)
    return slot


def test_runs_follow_the_block_table():
    kv = cache()
    slot = kv.allocate()
    assert kv.ensure(slot, 40)
    first = kv.tables[slot][0]
    assert kv.tables[slot] == [first, first + 1, first + 2]  # grown into the next blocks
    assert kv.runs(slot, 40) == [(first * B, 40)]
    assert kv.contiguous_start(slot, 40) == first * B
    kv.tables[slot] = [5, 6, 9]  # a table with a hole
    assert kv.runs(slot, 35) == [(5 * B, 32), (9 * B, 3)]
    assert kv.contiguous_start(slot, 35) is None
    assert kv.indices(slot, 30, 35) == [6 * B + 14, 6 * B + 15, 9 * B, 9 * B + 1, 9 * B + 2]


def test_a_rerun_after_a_prefix_hit_stays_consecutive():
    """The block after the matched prefix is a cached block nobody holds: the new sequence
    grows into it rather than jumping elsewhere, so attention still reads one view."""
    kv = cache()
    tokens = list(range(100))
    kv.free(committed(kv, tokens))  # all six full blocks stay cached
    b = kv.allocate()
    matched = kv.match_prefix(b, tokens)
    assert matched == 96
    assert kv.ensure(b, 120)
    assert kv.contiguous_start(b, 120) is not None
    assert kv.runs(b, 120) == [(kv.tables[b][0] * B, 120)]


def test_shared_prefix_blocks_are_never_taken_for_growth():
    kv = cache()
    tokens = list(range(64))
    a = committed(kv, tokens)
    b = kv.allocate()
    assert kv.match_prefix(b, tokens + [7] * 20) == 64
    assert kv.ensure(b, 84)
    assert kv.tables[b][:4] == kv.tables[a]  # shared with the live sequence
    assert kv.tables[b][4] not in kv.tables[a]


def test_a_cached_continuation_outlives_requests_that_share_only_its_prefix():
    """A (a 2-block system prompt, then its own 3 blocks) finished and stays cached; B and
    C share only the system prompt. Their growth goes to free blocks, not into A's cached
    continuation, so A's next turn still finds all of its blocks. With no free block left,
    the least recently used cached block goes first."""
    kv = cache(num_blocks=12)
    system, turn = list(range(32)), list(range(100, 148))
    a = committed(kv, system + turn)
    a_blocks = list(kv.tables[a])
    kv.free(a)
    own = []  # B's and C's blocks past the shared prefix
    for other in (range(200, 248), range(300, 348)):
        slot = kv.allocate()
        assert kv.match_prefix(slot, system + list(other)) == 32
        assert kv.ensure(slot, 80)
        own.append(kv.tables[slot][2:])
        assert not set(own[-1]) & set(a_blocks)
        kv.commit(slot, 80, system + list(other))
        kv.free(slot)
    again = kv.allocate()
    assert kv.match_prefix(again, system + turn + [1]) == 80  # every full block of A's turn
    kv.free(again)
    # 12 blocks: A's 5, B's and C's 3 each, one free: a new 3-block sequence takes the free
    # one, then evicts the least recently used cached blocks (B's, not A's, used just now)
    d = kv.allocate()
    assert kv.ensure(d, 48)
    assert sorted(kv.tables[d]) == sorted({*range(12)} - {*a_blocks, *own[0], *own[1]} | set(own[0][:2]))


def _attend_all(read_mode: str, monkeypatch) -> torch.Tensor:
    cfg = ModelConfig(
        family="llama",
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        sliding_layers=(False,),
    )
    torch.manual_seed(0)
    attn = Attention(cfg, sliding=False)
    kv = KVCache(1, 2, 256, 2, 8, torch.float32, "cpu", block_size=B, num_blocks=32)
    torch.nn.init.normal_(kv.k[0])
    torch.nn.init.normal_(kv.v[0])
    slot = kv.allocate()
    kv.tables[slot] = {"view": [3, 4, 5, 6], "runs": [3, 4, 10, 11], "gather": [3, 8, 12, 20]}[read_mode]
    kv.lengths[slot] = 50
    q = torch.randn(4, 3, 8)
    k, v = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    monkeypatch.setattr(layers, "MAX_READ_RUNS", 2)
    meta = build_attention_metadata(kv, [slot], [3], [50], torch.device("cpu"))
    expected = {"view": int, "runs": list, "gather": torch.Tensor}[read_mode]
    assert isinstance(meta.reads[0], expected)
    # the same logical cache contents wherever the blocks lie
    logical = torch.randn(2, 53, 8, generator=torch.Generator().manual_seed(1))
    index = torch.tensor(kv.indices(slot, 0, 50))
    kv.k[0][:, index] = logical[:, :50]
    kv.v[0][:, index] = logical[:, :50] * 0.5
    return attn.attend(q, k, v, meta, kv.k[0], kv.v[0])


def test_view_runs_and_gather_reads_agree(monkeypatch):
    view = _attend_all("view", monkeypatch)
    assert torch.equal(view, _attend_all("runs", monkeypatch))
    assert torch.equal(view, _attend_all("gather", monkeypatch))


def test_reset_prefix_cache_frees_cached_blocks_and_forgets_keys():
    kv = cache()
    tokens = list(range(64))
    a = committed(kv, tokens)
    kv.free(committed(kv, [9] * 32))  # two cached blocks nobody holds
    free_before = kv.num_free_blocks
    assert kv.reset_prefix_cache() == 2
    assert kv.num_free_blocks == free_before  # they were takeable before, and still are
    c = kv.allocate()
    assert kv.match_prefix(c, tokens + [1]) == 0  # a's blocks are no longer found either
    kv.free(a)
    assert kv.num_free_blocks == kv.num_blocks
