"""Qwen2 / Qwen2.5: Llama layout with a bias on the Q, K and V projections."""

from __future__ import annotations

from typing import Any

from specserve.config import ModelConfig
from specserve.model.hf_config import common_dims, rope_from_hf, sliding_layers_from_hf

HF_ARCHITECTURES = ("Qwen2ForCausalLM",)
GGUF_ARCHITECTURES = ("qwen2",)


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    dims = common_dims(cfg)
    use_window = bool(cfg.get("use_sliding_window")) and cfg.get("sliding_window")
    return ModelConfig(
        family="qwen2",
        architecture="Qwen2ForCausalLM",
        rope=rope_from_hf(cfg),
        qkv_bias=True,
        sliding_layers=sliding_layers_from_hf(cfg, dims["num_layers"]) if use_window else (),
        sliding_window=int(cfg["sliding_window"]) if use_window else None,
        **dims,
    )
