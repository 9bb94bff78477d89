"""Saving and loading trained draft heads (EAGLE, Medusa): a directory with a
`config.json` (the kind, the target shapes it was trained for, how it was trained) and
`head.safetensors` (bf16 weights). The target's embeddings and LM head are borrowed at
load time, never saved."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

PACKAGED_HEADS = Path(__file__).resolve().parent.parent / "heads"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "head.safetensors"
TARGET_KEYS = ("hidden_size", "vocab_size", "num_heads", "num_kv_heads")


def head_dir(kind: str, arg: str, packaged: Path) -> str | Path:
    """The head directory `--spec KIND[:DIR]` names: DIR, else the packaged heads."""
    if not arg and not (packaged / WEIGHTS_NAME).is_file():
        raise ValueError(f"no packaged {kind} head: train one with `specserve train-drafter --kind {kind}` "
                         f"and use {kind}:DIR")
    return arg or packaged


def lm_head_weight(target: Any) -> torch.Tensor:
    """The target's LM head matrix `[vocab, hidden]` (the embedding when tied)."""
    if target.config.tie_word_embeddings:
        return target.embed_tokens.weight
    weight = getattr(target.lm_head, "weight", None)
    if weight is None:  # prepacked for oneDNN: the plain matrix is gone
        raise ValueError("a trained draft head needs the target's LM head matrix: load the target in float32")
    return weight


def bind_lm_rows(target: Any, draft_ids: torch.Tensor) -> torch.Tensor:
    """The target's LM head rows of a draft vocabulary `[draft vocab, hidden]`."""
    weight = lm_head_weight(target)
    return weight.detach().index_select(0, draft_ids.to(weight.device))


def native_rows(target: Any, rows: torch.Tensor) -> Any:
    """Those rows on the target's native LM-head kernel (`NativeLMHead`), or None where the
    target has none (PyTorch path, fp32, training)."""
    head = getattr(target, "native_head", None)
    if head is None or rows.dtype != torch.bfloat16 or rows.shape[0] % 32:
        return None
    from specserve.model.native import NativeLMHead

    return NativeLMHead(rows, head.lib)


def draft_logits(x: torch.Tensor, rows: torch.Tensor, native: Any) -> torch.Tensor:
    """`[..., hidden] -> [..., draft vocab]` fp32 logits over the draft vocabulary rows."""
    if native is not None and x.dtype == torch.bfloat16:
        return native(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], rows.shape[0])
    return (x.to(rows.dtype) @ rows.T).float()


def save_head_dir(head: nn.Module, out_dir: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in head.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    cfg = head.config
    info = {
        "kind": head.kind,
        **{key: getattr(cfg, key) for key in TARGET_KEYS},
        "draft_vocab_size": int(head.draft_ids.numel()),
        **head.config_entries(),
        **meta,
    }
    (out / CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_head_dir(path: str | os.PathLike[str], target: nn.Module, kind: str) -> tuple[dict[str, Any], dict]:
    """(config, weights) of a head directory of `kind`, checked against the target's shapes."""
    from safetensors.torch import load_file

    root = Path(path)
    if not (root / CONFIG_NAME).is_file() or not (root / WEIGHTS_NAME).is_file():
        raise ValueError(f"{kind}:{path}: not a draft head directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    info = json.loads((root / CONFIG_NAME).read_text(encoding="utf-8"))
    if info.get("kind") != kind:
        raise ValueError(f"{kind}:{path}: the head is of kind {info.get('kind')!r}, not {kind!r}")
    for key in TARGET_KEYS:
        if info.get(key) != getattr(target.config, key):
            raise ValueError(
                f"{kind}:{path}: the head was trained for a target with {key} {info.get(key)}, "
                f"this model has {getattr(target.config, key)} (train one with `specserve train-drafter`)"
            )
    return info, load_file(str(root / WEIGHTS_NAME))


def finish_load(head: nn.Module, target: nn.Module, info: dict[str, Any]):
    """Move a freshly loaded head to the target's device and dtype, frozen, bound to the target."""
    head = head.to(device=target.device, dtype=target.dtype)
    head.draft_ids = head.draft_ids.long()
    head.eval().requires_grad_(False)
    head.info = info
    layer = getattr(head, "layer", None)
    if target.native is not None and layer is not None:
        from specserve.model.native import NativeDecoder

        # the target's native layers, for the head's decoder layer too (before packing)
        head.native = NativeDecoder(target.config, [layer], target.rope, target.native.lib)
    if any(type(m).__name__ == "PackedLinear" for m in target.modules()):
        from specserve.model.cpu_kernels import pack_linears

        pack_linears(head)  # the target's bf16 fast path, for the head's own linears too
    elif target.native is not None:
        from specserve.model.native import pack_native_linears

        pack_native_linears(head, target.native.lib)  # no oneDNN bf16 here (AVX2): the native kernel
    return head.bind(target)
