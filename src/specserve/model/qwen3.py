"""Qwen3: per-head RMSNorm on queries and keys before RoPE."""

from __future__ import annotations

from typing import Any

from specserve.config import ModelConfig
from specserve.model.hf_config import qwen_style_config

HF_ARCHITECTURES = ("Qwen3ForCausalLM",)
GGUF_ARCHITECTURES = ("qwen3",)


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    return qwen_style_config(cfg, "qwen3", "Qwen3ForCausalLM", qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=True)
