"""Vectorised dequantisation of the common GGUF block formats in torch.

Much faster than the generic numpy path in `gguf.quants` for the formats small models
ship in; every other format falls back to it.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as np_dequantize


def _f16(raw: torch.Tensor) -> torch.Tensor:  # [blocks, 2] uint8 -> [blocks, 1] fp32
    return raw.contiguous().view(torch.float16).float()


def dequantize(data: np.ndarray, qtype: Q, shape: list[int]) -> torch.Tensor:
    """Return the tensor as fp32 with `shape` (row-major, Hugging Face order)."""
    if qtype == Q.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)
    if qtype == Q.F16:
        return torch.from_numpy(np.array(data, dtype=np.float16)).float().reshape(shape)
    if qtype == Q.BF16:
        raw = torch.from_numpy(np.array(data).view(np.int16))
        return raw.view(torch.bfloat16).float().reshape(shape)
    raw = torch.from_numpy(np.array(data, dtype=np.uint8)).reshape(-1)
    if qtype == Q.Q8_0:  # 2-byte scale + 32 int8
        blocks = raw.view(-1, 34)
        out = _f16(blocks[:, :2]) * blocks[:, 2:].contiguous().view(torch.int8).float()
    elif qtype in (Q.Q4_0, Q.Q4_1):  # scale (+ min) + 16 bytes of nibbles: low nibbles first
        head = 2 if qtype == Q.Q4_0 else 4
        blocks = raw.view(-1, head + 16)
        qs = blocks[:, head:]
        nibbles = torch.cat((qs & 0x0F, qs >> 4), dim=1).float()  # [blocks, 32]
        d = _f16(blocks[:, :2])
        out = d * (nibbles - 8) if qtype == Q.Q4_0 else d * nibbles + _f16(blocks[:, 2:4])
    else:
        return torch.from_numpy(np.ascontiguousarray(np_dequantize(data, qtype), dtype=np.float32)).reshape(shape)
    return out.reshape(shape)
