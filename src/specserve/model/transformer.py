"""The decoder: embeddings, a stack of shared `DecoderLayer`s, final norm, LM head."""

from __future__ import annotations

import torch
from torch import nn

from specserve.cache.kv_cache import KVCache
from specserve.config import ModelConfig
from specserve.model.layers import AttentionMetadata, DecoderLayer, RMSNorm, RotaryTable, greedy_ids
from specserve.model.native import NativeDecoder, NativeLMHead


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.config = cfg
        self.max_len = max_len
        # the loader assigns every weight: no random init (on the meta device, Embedding's
        # normal_ init would import torch._dynamo, 2 s of every model load)
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, s) for s in cfg.sliding_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryTable(cfg.rope, cfg.head_dim, max_len)
        self.local_rope = RotaryTable(cfg.local_rope, cfg.head_dim, max_len) if cfg.local_rope else None
        # native bf16 layers for CPUs with AMX (specserve.model.native), set by the loader
        self.native: NativeDecoder | None = None
        self.native_head: NativeLMHead | None = None  # the LM head on the same kernels

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        cache: KVCache,
        layer_mask: list[bool] | None = None,
        taps: dict[int, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:  # [T, hidden] after the final norm
        """Run the flattened batch through the stack; writes K/V into `cache`.

        `layer_mask[i] = False` skips layer i (self-speculation drafts with a subset).
        `taps` maps layer indices to None; each is set to a copy of that layer's output
        `[T, hidden]` (the residual stream, before any norm), the features an EAGLE head
        with `feature_layers` reads beside the final hidden state.
        """
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale is not None:
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype)
        if self.native is not None and self.native.run(x, positions, meta, cache.k, cache.v, layer_mask, taps):
            return self.native.norm(x, self.norm)
        cos, sin = self.rope.lookup(positions, x.dtype)
        if self.local_rope is not None:
            lcos, lsin = self.local_rope.lookup(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            if layer_mask is not None and not layer_mask[i]:
                continue
            if self.local_rope is not None and layer.self_attn.sliding:
                x = layer(x, lcos, lsin, meta, cache.k[i], cache.v[i])
            else:
                x = layer(x, cos, sin, meta, cache.k[i], cache.v[i])
            if taps is not None and i in taps:
                taps[i] = x.clone()
        return self.norm(x)

    def num_parameters(self) -> int:
        """Weights of the model (prepacked linear weights and a tied head counted once)."""
        seen: set[int] = set()
        total = 0
        for t in [*self.parameters(), *(m.packed for m in self.modules() if hasattr(m, "packed"))]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
        if self.config.tie_word_embeddings and hasattr(self.lm_head, "packed"):
            total -= self.lm_head.packed.numel()  # a packed copy of the tied embedding
        return total

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, hidden]` -> `[N]` int64: each row's argmax of `compute_logits(hidden)` (the
        first of equal maxima), on the native head's fused kernel where it has one."""
        if self.native_head is not None and hidden.dtype == torch.bfloat16 and hidden.dim() == 2:
            return self.native_head.greedy(hidden)
        return greedy_ids(self.compute_logits(hidden))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, hidden]` -> `[N, vocab]` fp32."""
        if self.native_head is not None and hidden.dtype == torch.bfloat16 and hidden.dim() == 2:
            return self.native_head(hidden)
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
