"""Llama family: Llama 2/3 (llama3 RoPE scaling), SmolLM2, Mistral."""

from __future__ import annotations

from typing import Any

from specserve.config import ModelConfig
from specserve.model.hf_config import common_dims, rope_from_hf

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
GGUF_ARCHITECTURES = ("llama",)


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported")
    dims = common_dims(cfg)
    window = cfg.get("sliding_window")
    return ModelConfig(
        family="llama",
        architecture=(cfg.get("architectures") or ["LlamaForCausalLM"])[0],
        rope=rope_from_hf(cfg),
        sliding_layers=(bool(window),) * dims["num_layers"],
        sliding_window=int(window) if window else None,
        **dims,
    )
