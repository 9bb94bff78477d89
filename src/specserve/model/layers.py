"""Shared decoder layers: norms, rotary embeddings, attention over the KV cache, MLP.

Every family is this code with different `ModelConfig` flags. Inputs are flattened over
the batch (`[T, ...]`, T = tokens of all sequences in the forward); attention metadata
says which tokens belong to which sequence and where they sit in the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specserve.cache.kv_cache import KVCache
from specserve.config import ModelConfig, RopeConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if x.dtype == self.weight.dtype:
            # the fused kernel accumulates in fp32 for reduced-precision inputs
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:  # [N, V] -> [N] int64
    """Each row's argmax: the first of equal maxima, a NaN taken as the maximum. The same
    indices as `logits.argmax(-1)`; `max` computes them 2-3x faster on the CPU (a [36, 49152]
    fp32 block: 0.46 against 1.12 ms)."""
    return logits.max(dim=-1).indices


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` (fp32), with linear or llama3 scaling applied."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryTable(nn.Module):
    """Precomputed cos/sin `[max_len, head_dim]` (halves duplicated, rotate-half layout)."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_len: int) -> None:
        super().__init__()
        # built on the CPU explicitly, so a model constructed on the meta device still has it
        inv_freq = rope_inv_freq(rope, head_dim)
        t = torch.arange(max_len, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)  # [max_len, D]
        self.register_buffer("sin", emb.sin(), persistent=False)  # [max_len, D]

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [T] -> cos, sin [T, 1, D] ready to broadcast over heads
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos/sin [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# A sequence whose cache entries lie in at most this many runs of consecutive pool indices
# is read by concatenating the runs (sequential copies, which the prefetcher streams);
# beyond it, by one gather (each token's row fetched on its own: latency-bound when cold).
MAX_READ_RUNS = 8


@dataclass(frozen=True)
class CausalBatch:
    """Training-time attention: `batch` sequences of `length` tokens each, flattened
    row by row, causal, with no KV cache (a draft head learns with it)."""

    batch: int
    length: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Attention) -> torch.Tensor:
        B, L, D = self.batch, self.length, attn.head_dim
        out = F.scaled_dot_product_attention(
            q.reshape(attn.num_heads, B, L, D).transpose(0, 1),
            k.reshape(attn.num_kv_heads, B, L, D).transpose(0, 1),
            v.reshape(attn.num_kv_heads, B, L, D).transpose(0, 1),
            is_causal=True,
            scale=attn.scale,
            enable_gqa=attn.num_heads != attn.num_kv_heads,
        )  # [B, Hq, L, D]
        return out.transpose(1, 2).reshape(B * L, attn.q_size)


class UnrolledBatch:
    """Training-time test (EAGLE-3) for a one-layer draft head unrolled over steps.

    `batch` sequences of `length` tokens, flattened row by row, run through the same layer
    once per step (step 0 first; create one instance per batch). Step 0 is causal
    attention over the real inputs. At step s > 0, row i stands for the depth-(s + 1) draft
    of a drafting step rooted at i - s: as in drafting, it sees the step-0 keys of rows
    0..i - s (the real context) and, of each step r = 1..s, the key of row i - s + r (its
    draft ancestors, then itself); nothing else. Rows i < s have no root; their outputs are
    defined (they see their own key) but stand for nothing.
    """

    def __init__(self, batch: int, length: int) -> None:
        self.batch, self.length = batch, length
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # (k, v) [B, Hkv, L, D] per step

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Attention) -> torch.Tensor:
        B, L, D = self.batch, self.length, attn.head_dim
        s = len(self.steps)
        self.steps.append((k.reshape(attn.num_kv_heads, B, L, D).transpose(0, 1),  # [B, Hkv, L, D]
                           v.reshape(attn.num_kv_heads, B, L, D).transpose(0, 1)))
        if s == 0:  # the real inputs: plain causal attention
            return CausalBatch(B, L).attend(q, k, v, attn)
        q = q.reshape(attn.num_heads, B, L, D).transpose(0, 1)  # [B, Hq, L, D]
        group = attn.num_heads // attn.num_kv_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, Hkv, L, D] -> [B, Hq, L, D]
            return t.repeat_interleave(group, dim=1) if group > 1 else t

        def shifted(t: torch.Tensor, by: int) -> torch.Tensor:  # row i holds row i - by (zeros above)
            return F.pad(t, (0, 0, by, 0))[:, :, :L] if by else t

        k0, v0 = self.steps[0]
        rows = torch.arange(L, device=q.device)
        context = (rows[None, :] <= rows[:, None] - s)  # [L, L]: step-0 key j <= i - s
        scores = [(q @ heads(k0).transpose(-1, -2) * attn.scale).masked_fill(~context, float("-inf"))]
        for r in range(1, s + 1):  # the ancestor (or self) of step r: row i - (s - r)
            kr = shifted(self.steps[r][0], s - r)
            d = (q * heads(kr)).sum(-1, keepdim=True) * attn.scale  # [B, Hq, L, 1]
            scores.append(d.masked_fill((rows < s - r)[:, None], float("-inf")))
        p = torch.cat(scores, dim=-1).softmax(dim=-1)
        out = p[..., :L] @ heads(v0)
        for r in range(1, s + 1):
            out = out + p[..., L + r - 1 : L + r] * heads(shifted(self.steps[r][1], s - r))
        return out.transpose(1, 2).reshape(B * L, attn.q_size)


@dataclass
class AttentionMetadata:
    """Where the tokens of a flattened batch go.

    Sequence i owns tokens `query_starts[i]:query_starts[i+1]` of the forward, which sit
    at cache indices `cache_starts[i]` on. `write_index` `[T]` holds the KV pool index of
    every token of the forward. `reads[i]` says where sequence i's cache entries
    `0..cache_starts[i] + q_len - 1` lie in the pool: an int (they are consecutive from
    there), a few runs `[(first index, count), ...]` to concatenate, or an index tensor
    to gather them. `masks[i]` is the boolean attention mask
    `[q_len, cache_start + q_len]` of a full-attention layer, or None for plain causal
    attention; `sliding_masks[i]` the same for sliding layers. `causal[i]` is True when
    `masks[i]` (if any) is the plain causal mask of a chain, False for a token tree (None:
    unknown); kernels with their own causal path skip reading the mask.
    """

    query_starts: list[int]  # len = num_seqs + 1
    cache_starts: list[int]
    write_index: torch.Tensor
    reads: list[int | list[tuple[int, int]] | torch.Tensor]
    masks: LazyMasks | list[torch.Tensor | None]
    sliding_masks: LazyMasks | list[torch.Tensor | None]
    causal: list[bool] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.cache_starts)


class LazyMasks:
    """Per-sequence attention masks, each built on first access: the native kernel reads a
    chain's `causal` flag and never needs its mask, the PyTorch path builds it once."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._specs: list[tuple[int, int, torch.Tensor | None]] = []  # (new tokens, cached, tree mask)
        self._built: dict[int, torch.Tensor | None] = {}

    def append(self, spec: tuple[int, int, torch.Tensor | None]) -> None:
        self._specs.append(spec)

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> torch.Tensor | None:
        if i not in self._built:
            q_len, start, tree = self._specs[i]
            if tree is None and (q_len == 1 or start == 0):
                mask = None  # one query sees everything cached; a pure causal prefill is SDPA's is_causal
            else:
                mask = torch.ones(q_len, start + q_len, dtype=torch.bool, device=self.device)
                mask[:, start:] = tree if tree is not None else torch.ones(
                    q_len, q_len, dtype=torch.bool, device=self.device
                ).tril()
            self._built[i] = mask
        return self._built[i]


def build_attention_metadata(
    cache: KVCache,
    slots: list[int],
    query_lens: list[int],
    cache_starts: list[int],
    device: torch.device,
    sliding_window: int | None = None,
    tree_masks: list[torch.Tensor | None] | None = None,
) -> AttentionMetadata:
    """Pool addresses and masks for chains (causal) and, where given, token trees.

    The slots must already own blocks for their new tokens (`KVCache.ensure`).
    `tree_masks[i]` is a boolean `[q_len, q_len]` mask among the new tokens of sequence i
    (ancestor-or-self); new tokens always see the whole cached prefix. Sliding layers
    additionally hide cache entries `window` or more tokens behind the query's index.
    """
    query_starts = [0]
    masks = LazyMasks(device)
    sliding: list[torch.Tensor | None] = []
    writes: list[int] = []
    reads: list[int | list[tuple[int, int]] | torch.Tensor] = []
    causal: list[bool] = []
    for i, (slot, q_len, start) in enumerate(zip(slots, query_lens, cache_starts)):
        query_starts.append(query_starts[-1] + q_len)
        total = start + q_len
        base = cache.contiguous_start(slot, total)
        if base is not None:
            writes.extend(range(base + start, base + total))
            reads.append(base)
        else:
            writes.extend(cache.indices(slot, start, total))
            runs = cache.runs(slot, total)
            if len(runs) <= MAX_READ_RUNS:
                reads.append(runs)
            else:
                reads.append(torch.tensor(cache.indices(slot, 0, total), dtype=torch.long, device=device))
        tree = tree_masks[i] if tree_masks is not None else None
        causal.append(tree is None)
        masks.append((q_len, start, tree))
        if sliding_window is not None and total > sliding_window:
            mask = masks[i]
            q_idx = torch.arange(start, total, device=device).unsqueeze(1)
            k_idx = torch.arange(total, device=device).unsqueeze(0)
            base_mask = mask if mask is not None else (k_idx <= q_idx)
            sliding.append(base_mask & (k_idx > q_idx - sliding_window))
        elif sliding_window is not None:
            sliding.append(masks[i])
    if sliding_window is None:
        sliding = masks  # no sliding layers read them: the same lazy masks
    write_index = torch.tensor(writes, dtype=torch.long, device=device)
    return AttentionMetadata(query_starts, list(cache_starts), write_index, reads, masks, sliding, causal)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.q_size
        self.kv_size = cfg.kv_size
        self.scale = cfg.scale
        self.sliding = sliding
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm: RMSNorm | None = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def project(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, D]
        sin: torch.Tensor,  # [T, 1, D]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [Hq, T, D], k/v [Hkv, T, D]
        T = x.shape[0]
        heads = self.num_heads + 2 * self.num_kv_heads
        qkv = self.qkv_proj(x).view(T, heads, self.head_dim)
        v = qkv[:, heads - self.num_kv_heads :]
        if self.q_norm is None:
            # queries and keys are adjacent heads: one rotary application for both
            qk = apply_rope(qkv[:, : self.num_heads + self.num_kv_heads], cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = apply_rope(self.q_norm(qkv[:, : self.num_heads]), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, self.num_heads : heads - self.num_kv_heads]), cos, sin)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def attend(
        self,
        q: torch.Tensor,  # [Hq, T, D]
        k: torch.Tensor,  # [Hkv, T, D]
        v: torch.Tensor,  # [Hkv, T, D]
        meta: AttentionMetadata,
        k_cache: torch.Tensor,  # [Hkv, P, D] pool
        v_cache: torch.Tensor,  # [Hkv, P, D] pool
    ) -> torch.Tensor:  # [T, Hq * D]
        """Write the new K/V of the whole batch into the pool, then attend per sequence."""
        if isinstance(meta, (CausalBatch, UnrolledBatch)):
            return meta.attend(q, k, v, self)
        T = q.shape[1]
        out_dtype = q.dtype
        q = q.to(k_cache.dtype)  # the cache may keep a wider dtype than the weights
        k_cache.index_copy_(1, meta.write_index, k.to(k_cache.dtype))
        v_cache.index_copy_(1, meta.write_index, v.to(v_cache.dtype))
        masks = meta.sliding_masks if self.sliding else meta.masks
        outs = []
        for i, read in enumerate(meta.reads):
            a, b = meta.query_starts[i], meta.query_starts[i + 1]
            start = meta.cache_starts[i]
            end = start + (b - a)
            if isinstance(read, int):
                keys, values = k_cache[:, read : read + end], v_cache[:, read : read + end]
            elif isinstance(read, list):
                keys = torch.cat([k_cache[:, first : first + n] for first, n in read], dim=1)
                values = torch.cat([v_cache[:, first : first + n] for first, n in read], dim=1)
            else:
                keys, values = k_cache.index_select(1, read), v_cache.index_select(1, read)
            mask = masks[i]
            causal = mask is None and start == 0 and b - a > 1
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, a:b].unsqueeze(0),
                    keys.unsqueeze(0),
                    values.unsqueeze(0),
                    attn_mask=mask,
                    is_causal=causal,
                    scale=self.scale,
                    enable_gqa=self.num_heads != self.num_kv_heads,
                )[0]
            )
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [Hq, T, D]
        return out.transpose(0, 1).reshape(T, self.q_size).to(out_dtype)

    def forward(self, x, cos, sin, meta, k_cache, v_cache) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        q, k, v = self.project(x, cos, sin)
        return self.o_proj(self.attend(q, k, v, meta, k_cache, v_cache))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = F.silu if cfg.hidden_act == "silu" else (lambda t: F.gelu(t, approximate="tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden]
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding: bool) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, sliding)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def forward(self, x, cos, sin, meta, k_cache, v_cache) -> torch.Tensor:  # x [T, hidden]
        h = self.self_attn(self.input_layernorm(x), cos, sin, meta, k_cache, v_cache)
        if self.pre_feedforward_layernorm is None:
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
