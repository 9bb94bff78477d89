"""Frozen, validated configuration objects.

`ModelConfig` is the one description of a decoder that every family maps onto; the
shared layers in `specserve.model.layers` read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ACTIVATIONS = ("silu", "gelu_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters for one kind of layer."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.theta <= 0:
            raise ValueError(f"rope theta must be > 0, got {self.theta}")
        if self.factor <= 0:
            raise ValueError(f"rope factor must be > 0, got {self.factor}")

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None, theta: float) -> "RopeConfig":
        """Build from a Hugging Face `rope_scaling` / `rope_parameters` dict."""
        if not params:
            return cls(theta=theta)
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        return cls(
            theta=float(params.get("rope_theta", theta)),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0) or 1.0),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer, family-independent."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    rope: RopeConfig = field(default_factory=RopeConfig)
    # rope used by sliding-window layers when it differs (Gemma 3); None = same as `rope`
    local_rope: RopeConfig | None = None
    # one flag per layer: True where the layer attends to a sliding window only
    sliding_layers: tuple[bool, ...] = ()
    sliding_window: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    # Gemma-style norms scale by (1 + weight); stored as an offset added at load
    norm_weight_offset: float = 0.0
    # Gemma-style extra norms after attention and after the MLP
    sandwich_norms: bool = False
    hidden_act: str = "silu"
    embed_scale: float | None = None
    attn_scale: float | None = None  # None = head_dim ** -0.5
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False
    architecture: str = ""  # the name the checkpoint gave (e.g. LlamaForCausalLM)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.hidden_act!r}; supported: {SUPPORTED_ACTIVATIONS}")
        if not self.sliding_layers:
            object.__setattr__(self, "sliding_layers", (False,) * self.num_layers)
        if len(self.sliding_layers) != self.num_layers:
            raise ValueError(f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers")
        if any(self.sliding_layers) and not self.sliding_window:
            raise ValueError("sliding-window layers given without a sliding_window size")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5
