"""Read a GGUF file's metadata and tensor table, fast.

`gguf.GGUFReader` builds a numpy view for every part of every metadata field: for a
tokenizer of 49,152 tokens and 48,900 merges that is about a million small views and
6 s of a 2-core CPU's time, on every model load. This reader parses the same header with
`struct` (0.23 s for that file), decodes metadata into plain Python values and maps
each tensor's bytes as a numpy view of one memory map, with the dtype and shape
`GGUFReader` would give them (so `gguf_quants.dequantize` takes either).

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64
metadata count; the metadata as (string key, u32 value type, value); the tensor infos as
(string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset); padding to
`general.alignment` (default 32); the tensor data. A string is a u64 length and UTF-8 bytes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format of one scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# ggml tensor types stored element-wise (everything else is a block format, read as bytes)
_PLAIN_TENSORS = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: list[int]  # ggml order (fastest-varying first), as in the file
    data: np.ndarray  # a read-only view of the file: elements, or [..., bytes per row] for block formats


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]  # key -> str | int | float | bool | list
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> tuple:
        try:
            values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as exc:
            raise ValueError(f"{self.path}: truncated GGUF header at byte {self.pos}") from exc
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (n,) = self.unpack("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError(f"{self.path}: truncated GGUF header (a string runs past the end of the file)")
        s = str(self.buf[self.pos : end], "utf-8", "replace")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type == _STRING:
                return [self.string() for _ in range(count)]
            if item_type == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            if item_type not in _NUMPY:
                raise ValueError(f"{self.path}: unknown GGUF array item type {item_type}")
            dtype = np.dtype(_NUMPY[item_type])
            end = self.pos + dtype.itemsize * count
            if end > len(self.buf):
                raise ValueError(f"{self.path}: truncated GGUF header (an array runs past the end of the file)")
            items = np.frombuffer(self.buf[self.pos : end], dtype=dtype).tolist()
            self.pos = end
            return items
        if vtype not in _SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF value type {vtype}")
        return self.unpack(_SCALARS[vtype])[0]


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse `path`'s header; tensor data stays on disk behind a read-only memory map.

    Raises:
        ValueError: not a GGUF file, an unsupported version or byte order, or a damaged header.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = os.fspath(path)
    mm = np.memmap(path, mode="r")
    buf = memoryview(mm)
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    cur.pos = 4
    (version,) = cur.unpack("I")
    if version not in _VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        order = " (a big-endian file?)" if swapped in _VERSIONS else ""
        raise ValueError(f"{path}: GGUF version {version}{order} is not supported; versions 2 and 3 are")
    n_tensors, n_kv = cur.unpack("QQ")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        (vtype,) = cur.unpack("I")
        metadata[key] = cur.value(vtype)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.unpack("I")
        dims = list(cur.unpack("Q" * n_dims))
        ggml_type, offset = cur.unpack("IQ")
        infos.append((name, dims, ggml_type, offset))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment {alignment} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment

    tensors, seen = [], set()
    for name, dims, ggml_type, offset in infos:
        if name in seen:
            raise ValueError(f"{path}: tensor {name} appears twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(ggml_type)
        except ValueError:
            raise ValueError(f"{path}: tensor {name} has unknown ggml type {ggml_type}") from None
        n_elems = int(np.prod(dims)) if dims else 1
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        np_dims = tuple(reversed(dims))
        start = data_start + offset
        if ggml_type in _PLAIN_TENSORS:
            dtype = np.dtype(_PLAIN_TENSORS[ggml_type])
            n_bytes = n_elems * dtype.itemsize
        else:
            dtype = np.dtype(np.uint8)
            n_bytes = n_elems * type_size // block_size
            np_dims = (*np_dims[:-1], np_dims[-1] // block_size * type_size)
        if start + n_bytes > len(mm):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        data = mm[start : start + n_bytes].view(dtype).reshape(np_dims)
        tensors.append(GGUFTensor(name, qtype, dims, data))
    return GGUFFile(path, version, metadata, tensors)
