"""Gemma 3 (text): interleaved sliding-window and global layers, QK-norm, GELU-tanh MLP,
sandwich norms scaling by (1 + weight), embeddings scaled by sqrt(hidden), and separate
RoPE bases for local and global layers."""

from __future__ import annotations

from typing import Any

from specserve.config import ModelConfig
from specserve.model.hf_config import common_dims, rope_from_hf, sliding_layers_from_hf

HF_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
GGUF_ARCHITECTURES: tuple[str, ...] = ()


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    if "text_config" in cfg:  # multimodal checkpoint: the language model only
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    if cfg.get("attn_logit_softcapping"):
        raise ValueError("Gemma checkpoints with attn_logit_softcapping are not supported")
    dims = common_dims(cfg)
    num_layers = dims["num_layers"]
    sliding = sliding_layers_from_hf(cfg, num_layers)
    if not cfg.get("layer_types"):
        pattern = int(cfg.get("sliding_window_pattern", 6))
        sliding = tuple((i + 1) % pattern != 0 for i in range(num_layers))
    global_rope = rope_from_hf(cfg, "full_attention", default_theta=1_000_000.0)
    if "rope_local_base_freq" in cfg:
        local_rope = rope_from_hf({"rope_theta": cfg["rope_local_base_freq"]})
    else:
        local_rope = rope_from_hf(cfg, "sliding_attention")
    return ModelConfig(
        family="gemma3",
        architecture="Gemma3ForCausalLM",
        rope=global_rope,
        local_rope=local_rope,
        sliding_layers=sliding,
        sliding_window=int(cfg.get("sliding_window") or 4096),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=True,
        norm_weight_offset=1.0,
        sandwich_norms=True,
        hidden_act="gelu_tanh",
        embed_scale=dims["hidden_size"] ** 0.5,
        attn_scale=float(cfg.get("query_pre_attn_scalar", dims["head_dim"])) ** -0.5,
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        **{**dims, "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))},
    )
