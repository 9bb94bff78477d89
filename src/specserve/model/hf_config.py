"""Helpers to read Hugging Face `config.json` fields shared by every family."""

from __future__ import annotations

from typing import Any

from specserve.config import ModelConfig, RopeConfig


def require(cfg: dict[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"config.json lacks the required field {key!r}")
    return cfg[key]


def rope_from_hf(cfg: dict[str, Any], layer_type: str | None = None, default_theta: float = 10000.0) -> RopeConfig:
    """Rope of a layer type from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        return RopeConfig.from_hf(params, float(params.get("rope_theta", default_theta)))
    return RopeConfig.from_hf(cfg.get("rope_scaling"), float(cfg.get("rope_theta", default_theta)))


def common_dims(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = int(require(cfg, "hidden_size"))
    heads = int(require(cfg, "num_attention_heads"))
    return dict(
        vocab_size=int(require(cfg, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(require(cfg, "intermediate_size")),
        num_layers=int(require(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def sliding_layers_from_hf(cfg: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
    layer_types = cfg.get("layer_types")
    if layer_types:
        return tuple(t == "sliding_attention" for t in layer_types)
    return (False,) * num_layers


def qwen_style_config(cfg: dict[str, Any], family: str, architecture: str, qkv_bias: bool, qk_norm: bool) -> ModelConfig:
    """Qwen2/Qwen3: Llama layout, optional per-layer sliding windows (`use_sliding_window`)."""
    dims = common_dims(cfg)
    use_window = bool(cfg.get("use_sliding_window")) and bool(cfg.get("sliding_window"))
    return ModelConfig(
        family=family,
        architecture=architecture,
        rope=rope_from_hf(cfg),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        sliding_layers=sliding_layers_from_hf(cfg, dims["num_layers"]) if use_window else (),
        sliding_window=int(cfg["sliding_window"]) if use_window else None,
        **dims,
    )
