"""Which family implements a checkpoint's architecture."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from specserve.config import ModelConfig
from specserve.model import gemma3, llama, qwen2, qwen3

FAMILIES: tuple[ModuleType, ...] = (llama, qwen2, qwen3, gemma3)


class UnsupportedArchitecture(ValueError):
    pass


def supported_hf_architectures() -> list[str]:
    return [a for f in FAMILIES for a in f.HF_ARCHITECTURES]


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    archs = cfg.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.HF_ARCHITECTURES for a in archs):
            return family.config_from_hf(cfg)
    raise UnsupportedArchitecture(
        f"unsupported architecture {archs or cfg.get('model_type')!r}; "
        f"supported: {', '.join(supported_hf_architectures())}"
    )


def family_for_gguf(arch: str) -> ModuleType:
    for family in FAMILIES:
        if arch in family.GGUF_ARCHITECTURES:
            return family
    supported = [a for f in FAMILIES for a in f.GGUF_ARCHITECTURES]
    raise UnsupportedArchitecture(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(supported)}")
