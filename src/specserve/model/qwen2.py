"""Qwen2 / Qwen2.5: Llama layout with a bias on the Q, K and V projections."""

from __future__ import annotations

from typing import Any

from specserve.config import ModelConfig
from specserve.model.hf_config import qwen_style_config

HF_ARCHITECTURES = ("Qwen2ForCausalLM",)
GGUF_ARCHITECTURES = ("qwen2",)


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    return qwen_style_config(cfg, "qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False)
