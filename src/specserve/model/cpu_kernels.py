"""CPU fast paths: oneDNN-prepacked bf16 linear layers.

On CPUs with native bf16 the oneDNN primitive with a prepacked (blocked) weight is
markedly faster than `F.linear` for the small-M matmuls of decoding, with identical
results. `pack_linears` swaps every `nn.Linear` of a bf16 CPU model for one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def packing_available(dtype: torch.dtype, device: torch.device) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's bf16 needs AVX-512 (or AVX-NE-CONVERT)
    )


class PackedLinear(nn.Module):
    """`y = x @ W.T + b` with W prepacked for oneDNN (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            # a copy, so tied embeddings keep their plain layout
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().clone(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")


def replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> int:
    """Replace each `nn.Linear` under `module` by `make(linear)`, where that is not None;
    returns how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if (new := make(child)) is not None:
                setattr(module, name, new)
                count += 1
        else:
            count += replace_linears(child, make)
    return count


def pack_linears(module: nn.Module) -> int:
    """Replace each `nn.Linear` under `module` by a `PackedLinear`; returns how many."""
    return replace_linears(module, PackedLinear)
