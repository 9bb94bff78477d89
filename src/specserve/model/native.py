"""Native bf16 decoder layers for x86-64 CPUs: AMX tiles (`csrc/decode.cpp`), or AVX2
and FMA on CPUs without AMX (`csrc/decode_avx2.cpp`, bf16 as a storage format with fp32
arithmetic; the same entry points, weight layout and rounding points).

At this model size PyTorch spends most of a decode step dispatching ~25 small ops per
layer, and its matmul library pays a fixed cost per call. `NativeDecoder` runs each
Llama-family layer of a forward as one call into a small C++ library instead: every
forward (decode steps, draft verification, prefill chunks, batches of sequences),
with AMX tile matmuls and the glue fused into loops. It is row-invariant: a token's
hidden states do not depend on what else is in the forward, so greedy decoding in
bf16 gives the same tokens alone, batched, speculated, after a prefix-cache hit or
after preemption.

The library is compiled at first use with the system's g++ into a cache directory
(`$SPECSERVE_CACHE`, else `$XDG_CACHE_HOME/specserve`, else `~/.cache/specserve`),
keyed by the source, the compiler and the CPU. Without g++, without AVX2 and FMA, for
other architectures, fp32 or CUDA, or with `SPECSERVE_NATIVE=0`, the model runs on
PyTorch. `SPECSERVE_NATIVE=avx2` takes the AVX2 library on an AMX CPU too.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specserve.model.cpu_kernels import replace_linears
from specserve.model.layers import AttentionMetadata, RMSNorm, greedy_ids

if TYPE_CHECKING:
    from collections.abc import Sequence

    from specserve.config import ModelConfig
    from specserve.model.layers import DecoderLayer, RotaryTable
    from specserve.model.transformer import DecoderModel

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16")  # the AMX library
AVX2_CPU_FLAGS = ("avx2", "fma")
# the libraries, best first: (kind, source, CPU flags it needs)
KINDS = (("AMX", CSRC / "decode.cpp", REQUIRED_CPU_FLAGS), ("AVX2", CSRC / "decode_avx2.cpp", AVX2_CPU_FLAGS))

_lock = threading.RLock()
_lib: ctypes.CDLL | None = None
_loaded: dict[str, tuple[ctypes.CDLL | None, str]] = {}  # per kind: the library, or why there is none
_tried = False
_why_not = ""


def cpuinfo_field(name: str) -> str | None:
    """The value of the first `name : value` line of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    return set((cpuinfo_field("flags") or "").split())


def cache_dir() -> Path:
    root = os.environ.get("SPECSERVE_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specserve"


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


def build(source: Path, verbose: bool = False) -> Path:
    """Compile `source` into a library if no build of it for this compiler and CPU exists;
    returns its path."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++) found")
    flags = sorted(_cpu_flags())
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), _compiler_version(cxx).encode(), " ".join(FLAGS).encode(), " ".join(flags).encode()])
    ).hexdigest()[:16]
    out = cache_dir() / "native" / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(source), "-o", tmp], check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{proc.stderr.strip()[-2000:]}")
        if verbose and proc.stderr:
            log.info("%s", proc.stderr)
        os.replace(tmp, out)  # atomic: a concurrent build of the same key is harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for stale in out.parent.glob(f"{source.stem}-*.so"):  # builds of older sources or other CPUs
        if stale != out:
            stale.unlink(missing_ok=True)
    return out


def load(kind: str) -> ctypes.CDLL | None:
    """The library of `kind` ("AMX" or "AVX2"), built and loaded on first use; None where
    the CPU lacks its instructions or it cannot be built (`_loaded[kind]` holds why)."""
    with _lock:
        if kind not in _loaded:
            _loaded[kind] = _load(kind)
        return _loaded[kind][0]


def _load(kind: str) -> tuple[ctypes.CDLL | None, str]:
    source, needs = {k: (src, flags) for k, src, flags in KINDS}[kind]
    missing = [f for f in needs if f not in _cpu_flags()]
    if missing:
        return None, f"the CPU lacks {', '.join(missing)}"
    try:
        lib = open_library(build(source))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        why = f"native kernels unavailable: {exc}"
        log.warning("%s; the %s library is not used", why, kind)
        return None, why
    if lib is None:
        why = "Linux refused the AMX tile state (arch_prctl)"
        log.warning("%s; the %s library is not used", why, kind)
        return None, why
    if hasattr(lib, "ss_set_wide_rows"):
        lib.ss_set_wide_rows(_choose_wide_rows(lib))
    return lib, ""


def _choose_wide_rows(lib: ctypes.CDLL, reps: int = 7) -> int:
    """Where the AVX2 library's linears switch to the wide path (32 rows), or 0 for never:
    `SPECSERVE_WIDE_ROWS` where set, else whichever of the two paths is faster here, timed
    on a 64-row prompt chunk's linear (a few ms). Both compute every output alike, so the
    choice changes speed only. Zen 1 runs prompt chunks 7-10% faster on the wide path,
    Zen 3 20-50% faster on the narrow one (docs/native.md)."""
    wanted = os.environ.get("SPECSERVE_WIDE_ROWS")
    if wanted is not None:
        try:
            return max(0, int(wanted))
        except ValueError:
            raise ValueError(f"SPECSERVE_WIDE_ROWS must be an int (0: never), got {wanted!r}") from None
    m, k, n = 64, 576, 1536
    gen = torch.Generator().manual_seed(0)
    packed = vnni_pack(torch.randn(n, k, generator=gen).to(torch.bfloat16))
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    times: dict[int, list[float]] = {32: [], 0: []}
    for rep in range(reps + 1):  # the first round warms up, untimed
        for rows in (32, 0) if rep % 2 else (0, 32):
            lib.ss_set_wide_rows(rows)
            t0 = time.perf_counter()
            lib.ss_linear(packed.data_ptr(), None, x.data_ptr(), y.data_ptr(), m, k, n)
            if rep:
                times[rows].append(time.perf_counter() - t0)
    wide, narrow = statistics.median(times[32]), statistics.median(times[0])
    log.info("prompt-chunk linears: wide path %.0f us, narrow %.0f us", 1e6 * wide, 1e6 * narrow)
    return 32 if wide < narrow else 0


def open_library(path: Path) -> ctypes.CDLL | None:
    """A built library (`build`) loaded and initialised, its entry points declared; None
    where its initialisation fails (the AMX tile state refused)."""
    lib = ctypes.CDLL(str(path))
    if lib.ss_init() != 0:
        return None
    i64p, f32 = ctypes.POINTER(ctypes.c_int64), ctypes.c_float
    vp, ci = ctypes.c_void_p, ctypes.c_int
    lib.ss_layer.argtypes = [i64p, i64p, f32, f32, vp, ci, ci, i64p, i64p, i64p, i64p, i64p, vp, vp, vp, vp]
    lib.ss_layer.restype = ci
    lib.ss_linear.argtypes = [vp, vp, vp, vp, ci, ci, ci]
    lib.ss_linear.restype = None
    lib.ss_linear_f32.argtypes = [vp, vp, vp, vp, ci, ci, ci]
    lib.ss_linear_f32.restype = None
    lib.ss_rmsnorm.argtypes = [vp, vp, vp, ci, ci, f32]
    lib.ss_rmsnorm.restype = None
    if hasattr(lib, "ss_linear_argmax"):  # the AMX library's greedy LM head
        lib.ss_linear_argmax.argtypes = [vp, vp, vp, ci, ci, ci]
        lib.ss_linear_argmax.restype = ci
    if hasattr(lib, "ss_set_wide_rows"):  # the AVX2 library's prompt-chunk path
        lib.ss_set_wide_rows.argtypes = [ci]
        lib.ss_set_wide_rows.restype = None
        lib.ss_wide_rows.argtypes = []
        lib.ss_wide_rows.restype = ci
    if hasattr(lib, "ss_screen"):  # the AVX2 library's screened greedy LM head
        lib.ss_screen.argtypes = [vp, vp, vp, vp, vp, vp, ci, ci, ci, vp, vp, vp, vp, ci, vp]
        lib.ss_screen.restype = ci
    return lib


def _switched_off(value: str) -> bool:
    """Whether an environment switch's value turns its feature off."""
    return value.strip().lower() in ("0", "false", "no", "off")


def library() -> ctypes.CDLL | None:
    """The library models use: AMX where the CPU has it, else AVX2 (`SPECSERVE_NATIVE=avx2`:
    AVX2 only; `0`: none), built on first use; None where none can run here."""
    global _lib, _tried, _why_not
    with _lock:
        if _tried:
            return _lib
        _tried = True
        wanted = os.environ.get("SPECSERVE_NATIVE", "1").strip().lower()
        if _switched_off(wanted):
            _why_not = "disabled by SPECSERVE_NATIVE"
            return None
        kinds = [k for k, _, _ in KINDS if wanted != "avx2" or k == "AVX2"]
        for kind in kinds:
            lib = load(kind)
            if lib is not None:
                _lib = lib
                return lib
        _why_not = _loaded[kinds[-1]][1]
        return None


def kind_of(lib: ctypes.CDLL) -> str:
    """"AMX" or "AVX2": which library `lib` is."""
    return next(k for k, (loaded, _) in _loaded.items() if loaded is lib)


def unavailable_reason() -> str:
    library()
    return _why_not


def vnni_pack(weight: torch.Tensor) -> torch.Tensor:
    """`[N, K]` bf16 -> `[N/16, K/2, 16, 2]`: 16 output rows x 2 inputs per 64 bytes."""
    n, k = weight.shape
    return weight.detach().reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear(lib: ctypes.CDLL, packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """`x [M, K] @ W.T (+ bias)` with a `vnni_pack`ed W (bias fp32)."""
    m, k = x.shape
    n = packed.shape[0] * 16
    y = torch.empty(m, n, dtype=torch.bfloat16)
    lib.ss_linear(packed.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(), y.data_ptr(), m, k, n)
    return y


class NativeLinear(torch.nn.Module):
    """`y = x @ W.T + b` on the native kernel, bf16 in and out (inference only): a draft
    head's own linears where oneDNN has no bf16 path (CPUs without AVX-512)."""

    def __init__(self, linear: torch.nn.Linear, lib: ctypes.CDLL) -> None:
        super().__init__()
        self.lib = lib
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = vnni_pack(linear.weight.detach().to(torch.bfloat16))
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        return linear(self.lib, self.packed, self.bias, flat).reshape(*x.shape[:-1], self.out_features)


def pack_native_linears(module: torch.nn.Module, lib: ctypes.CDLL) -> int:
    """Replace each bf16 `nn.Linear` under `module` whose shape the kernels take (outputs
    and inputs multiples of 32) by a `NativeLinear`; returns how many."""

    def make(child: torch.nn.Linear) -> NativeLinear | None:
        fits = child.weight.dtype == torch.bfloat16 and child.out_features % 32 == 0 and child.in_features % 32 == 0
        return NativeLinear(child, lib) if fits else None

    return replace_linears(module, make)


def kv_dtype(model: DecoderModel) -> torch.dtype:
    """The K/V pool dtype for `model`: bf16 for the native layers (their rotated keys and
    values are bf16 values, so nothing is lost, and attention reads half the bytes); on
    the PyTorch path fp32 on the CPU (its attention over fp32 is faster than over bf16,
    and more exact), the model's dtype elsewhere."""
    if model.native is not None:
        return torch.bfloat16
    return torch.float32 if model.device.type == "cpu" else model.dtype


class NativeLMHead:
    """The LM head on the AMX kernel: fp32 logits holding the bf16-rounded values, as
    `lm_head(x).float()` gives them, written once (no bf16 intermediate to widen)."""

    def __init__(self, weight: torch.Tensor, lib: ctypes.CDLL, screen: bool = False) -> None:  # [vocab, hidden] bf16
        self.lib = lib
        self.packed = vnni_pack(weight)
        self.vocab, self.hidden = weight.shape
        fits = screen and hasattr(lib, "ss_screen") and ScreenedHead.fits(weight)
        self.screen = ScreenedHead(weight, lib) if fits else None

    @classmethod
    def for_model(cls, model: DecoderModel) -> NativeLMHead | None:
        """Where the model's layers run natively and the head's shape fits the tiles; screened
        greedy rows (`argmax_logits`) on the AVX2 library unless `SPECSERVE_SCREEN=0`."""
        cfg = model.config
        if model.native is None or cfg.vocab_size % 32 or cfg.final_logit_softcapping:
            return None
        screen = not _switched_off(os.environ.get("SPECSERVE_SCREEN", "1"))
        return cls(model.lm_head.weight, model.native.lib, screen=screen)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:  # [M, hidden] bf16 -> [M, vocab] fp32
        x = hidden.contiguous()
        y = torch.empty(x.shape[0], self.vocab, dtype=torch.float32)
        if x.shape[0]:
            self.lib.ss_linear_f32(self.packed.data_ptr(), None, x.data_ptr(), y.data_ptr(), x.shape[0], self.hidden,
                                   self.vocab)
        return y

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:  # [M, hidden] bf16 -> [M] int64
        """Each row's argmax token of `self(hidden)` (the first of equal maxima, a NaN taken as
        the maximum, as torch's argmax). On the AMX library one fused call keeps a running
        maximum per row and writes no logits (`ss_linear_argmax`); elsewhere the argmax of
        `argmax_logits`."""
        x = hidden.contiguous()
        if hasattr(self.lib, "ss_linear_argmax") and x.shape[0]:
            ids = torch.empty(x.shape[0], dtype=torch.int64)
            if self.lib.ss_linear_argmax(self.packed.data_ptr(), x.data_ptr(), ids.data_ptr(), x.shape[0], self.hidden,
                                         self.vocab) == 0:
                return ids
        return greedy_ids(self.argmax_logits(x))

    def argmax_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [M, hidden] bf16 -> [M, vocab] fp32
        """Logits for argmax only: each row's maximum and every logit that could tie with it
        hold exactly `self(hidden)`'s values, the rest -inf (`ScreenedHead`); the full
        logits where there is no screen or it cannot decide."""
        x = hidden.contiguous()
        if self.screen is None or not self.screen.screen(x, self.packed, out := torch.empty(x.shape[0], self.vocab)):
            return self(x)
        return out


class ScreenedHead:
    """An int8 copy of an LM head that bounds every logit of the bf16 kernel's (`ss_screen`
    in csrc/decode_avx2.cpp): a greedy step reads 1 byte per weight instead of 2, then
    computes exactly only the 16-output groups holding a logit that can reach its row's
    maximum (a handful of the 3,072 groups of a 49,152-token vocabulary)."""

    CAP = 256  # candidates per row beyond which the full head is cheaper
    # up to 4 rows: on Zen 3 the screen takes 0.61x / 0.87x / 0.89x of the bf16 head's time at
    # 2 / 3 / 4 rows, about as much at 6 and more from 8; on Zen 1, from 3 rows, about as much
    # as the bf16 head (docs/native.md)
    MAX_ROWS = 4

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        """Whether the bounds hold for these weights: every row zero or its largest magnitude
        within 2^-40..2^40, where fp32 neither underflows nor overflows (trained heads are)."""
        amax = weight.abs().amax(dim=1).float()
        return bool(((amax == 0) | ((amax >= 2.0**-40) & (amax <= 2.0**40))).all())

    def __init__(self, weight: torch.Tensor, lib: ctypes.CDLL) -> None:  # [vocab, hidden] bf16
        self.lib = lib
        vocab, hidden = weight.shape
        gamma = 1.01 * hidden * 2.0**-24  # fp32 accumulation of `hidden` products
        up = 1.0 + 4 * hidden * 2.0**-24 + 1e-6  # fp32 norms of `hidden` terms, rounded up
        q = torch.empty(vocab, hidden, dtype=torch.int8)
        scale, cw, dw = (torch.empty(vocab, dtype=torch.float32) for _ in range(3))
        for lo in range(0, vocab, 4096):  # fp32 in slices; the bounds absorb its roundings
            w = weight[lo : lo + 4096].float()
            s = w.abs().amax(dim=1) / 127
            s[s == 0] = 1.0
            qs = torch.round(w / s[:, None]).clamp_(-127, 127)
            back = qs * s[:, None]  # sw * qw to one rounding (2^-24 of it)
            norm = w.norm(dim=1) * up
            slack = 2.0**-22 * norm  # what the roundings of `back` and `w - back` can hide
            q[lo : lo + 4096] = qs.to(torch.int8)
            scale[lo : lo + 4096] = s
            cw[lo : lo + 4096] = back.norm(dim=1) * up + slack
            dw[lo : lo + 4096] = (w - back).norm(dim=1) * up + slack + gamma * norm
        self.packed = q.reshape(vocab // 16, 16, hidden // 2, 2).permute(0, 2, 1, 3).contiguous()
        self.scale, self.cw, self.dw = scale, cw, dw
        self.vocab, self.hidden = vocab, hidden
        self._scratch: dict[int, tuple[torch.Tensor, ...]] = {}
        self.groups = -1  # groups the last call computed exactly (-1: it handed over to the full head)

    def screen(self, x: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> bool:
        """Fill `out [M, vocab]` with the bf16 head's (`packed`) logits wherever one can be
        its row's maximum, -inf elsewhere; False (out untouched) when the screen cannot
        decide: too many rows or candidates, a non-finite input."""
        m = x.shape[0]
        if not 0 < m <= self.MAX_ROWS:
            return False
        if m not in self._scratch:
            self._scratch[m] = (
                torch.empty(m, self.vocab, dtype=torch.float32),
                torch.empty(m, self.vocab // 16, dtype=torch.float32),
                torch.empty(m, self.CAP, dtype=torch.int32),
                torch.empty(m, dtype=torch.int32),
            )
        hi, glo, cand, ncand = self._scratch[m]
        self.groups = self.lib.ss_screen(
            self.packed.data_ptr(), self.scale.data_ptr(), self.cw.data_ptr(), self.dw.data_ptr(), packed.data_ptr(),
            x.data_ptr(), m, self.hidden, self.vocab, hi.data_ptr(), glo.data_ptr(), cand.data_ptr(),
            ncand.data_ptr(), self.CAP, out.data_ptr(),
        )
        return self.groups >= 0


def supports(model: DecoderModel) -> str | None:
    """Why `model` cannot use the native layers, or None when it can."""
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return "native layers run bf16 models on the CPU only"
    return supports_config(model.config)


def supports_config(cfg: ModelConfig) -> str | None:
    """Why a model of this architecture cannot use the native layers, or None when it can."""
    if cfg.qk_norm or cfg.sandwich_norms or cfg.hidden_act != "silu" or any(cfg.sliding_layers):
        return f"native layers cover the Llama family (plain norms, SiLU, full attention), not {cfg.family}"
    if cfg.head_dim % 32 or cfg.head_dim > 256 or cfg.hidden_size % 32 or cfg.intermediate_size % 32:
        return "native layers need head_dim % 32 == 0 (<= 256) and hidden/intermediate sizes % 32 == 0"
    if cfg.num_heads % cfg.num_kv_heads or cfg.num_heads // cfg.num_kv_heads > 16:
        return "native layers need num_heads to be a multiple of num_kv_heads, at most 16 times it"
    return None


class _Layer:
    """One layer's weights in the native layout, and the pointer table the call reads."""

    def __init__(self, layer: DecoderLayer) -> None:  # with plain nn.Linear weights
        attn, mlp = layer.self_attn, layer.mlp
        self.keep = [
            layer.input_layernorm.weight.detach().contiguous(),
            layer.post_attention_layernorm.weight.detach().contiguous(),
            vnni_pack(attn.qkv_proj.weight),
            None if attn.qkv_proj.bias is None else attn.qkv_proj.bias.detach().float().contiguous(),
            vnni_pack(attn.o_proj.weight),
            vnni_pack(mlp.gate_up_proj.weight),
            vnni_pack(mlp.down_proj.weight),
        ]
        self.ptrs = (ctypes.c_int64 * 9)(*[0 if t is None else t.data_ptr() for t in self.keep], 0, 0)


class NativeDecoder:
    """Runs a stack of Llama-family decoder layers natively (see the module doc): a
    model's layers, or the one layer of an EAGLE head. Build it from the layers' plain
    `nn.Linear` weights, before they are packed for oneDNN."""

    def __init__(self, cfg: ModelConfig, layers: Sequence[DecoderLayer], rope: RotaryTable, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.layers = [_Layer(layer) for layer in layers]
        self.eps = float(cfg.rms_norm_eps)
        self.scale = float(layers[0].self_attn.scale)
        self.dims = (ctypes.c_int64 * 6)(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, 0
        )
        self.cos = rope.cos
        self.sin = rope.sin

    @classmethod
    def for_model(cls, model: DecoderModel) -> NativeDecoder | None:
        """The native layers of `model`, or None where they cannot run (see `describe`)."""
        if supports(model) is not None or (lib := library()) is None:
            return None
        return cls(model.config, list(model.layers), model.rope, lib)

    def norm(self, x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        """`norm(x)` (an `RMSNorm` after the layers) on the library's kernel: torch's
        rms_norm of bf16 rows, fp32 inside and rounded once, without the op's dispatch (on
        the AVX2 CPU 0.26 ms a call inside a step for 2 rows, against 0.11 ms). The sums run
        in another order than torch's, so about 2 elements in 100,000 differ by a rounding."""
        w = norm.weight
        if type(norm) is not RMSNorm or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.dim() != 2:
            return norm(x)
        x = x.contiguous()
        y = torch.empty_like(x)
        self.lib.ss_rmsnorm(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], float(norm.eps))
        return y

    def run(
        self,
        x: torch.Tensor,  # [T, hidden] bf16, updated in place
        positions: torch.Tensor,
        meta: AttentionMetadata | object,
        k_pools: list[torch.Tensor],
        v_pools: list[torch.Tensor],
        layer_mask: list[bool] | None,
        taps: dict[int, torch.Tensor | None] | None = None,
    ) -> bool:
        """Run every (unskipped) layer natively; False (x untouched) when this forward does
        not qualify (training batches without a KV cache, a pool that is not bf16). `taps`
        as in `DecoderModel.forward`: the listed layers' outputs are copied into it."""
        if not isinstance(meta, AttentionMetadata):
            return False
        pool = k_pools[0]
        if not x.is_contiguous() or pool.dtype != torch.bfloat16 or not pool.is_contiguous():
            return False
        if int(positions.max()) >= self.cos.shape[0]:  # the C++ side does not check bounds
            raise IndexError(f"position {int(positions.max())} is past the rotary table ({self.cos.shape[0]})")
        n = meta.num_seqs
        keep: list[torch.Tensor] = []  # index and mask tensors the call reads
        bases, kidx = [], []
        for read in meta.reads:
            if isinstance(read, int):
                bases.append(read)
                kidx.append(0)
                continue
            if isinstance(read, list):
                read = torch.cat([torch.arange(first, first + count) for first, count in read])
            keep.append(read.to(torch.int64).contiguous())
            bases.append(0)
            kidx.append(keep[-1].data_ptr())
        mptr = []
        for i in range(n):
            # a chain takes the kernel's own causal path (its mask is never built)
            m = None if meta.causal is not None and meta.causal[i] else meta.masks[i]
            if m is not None:
                keep.append(m.contiguous())
            mptr.append(0 if m is None else keep[-1].data_ptr())
        i64 = ctypes.c_int64 * n
        pos = positions.contiguous()
        widx = meta.write_index.contiguous()
        self.dims[5] = pool.shape[1]
        args = (
            self.dims, ctypes.c_float(self.eps), ctypes.c_float(self.scale), x.data_ptr(), x.shape[0], n,
            (ctypes.c_int64 * (n + 1))(*meta.query_starts), i64(*meta.cache_starts), i64(*bases), i64(*kidx),
            i64(*mptr), pos.data_ptr(), widx.data_ptr(), self.cos.data_ptr(), self.sin.data_ptr(),
        )
        for i, layer in enumerate(self.layers):
            if layer_mask is not None and not layer_mask[i]:
                continue
            layer.ptrs[7] = k_pools[i].data_ptr()
            layer.ptrs[8] = v_pools[i].data_ptr()
            if self.lib.ss_layer(layer.ptrs, *args) != 0:
                raise RuntimeError("native layer rejected its shapes")  # supports() rules these out
            if taps is not None and i in taps:
                taps[i] = x.clone()
        return True


def status() -> str:
    """Whether this machine can run native layers, in one line (the set-up script prints it)."""
    lib = library()
    return f"native ({kind_of(lib)}), {lib._name}" if lib is not None else f"pytorch ({_why_not})"


def describe(model: DecoderModel) -> str:
    """Which path `model`'s layers take, and why not the native one (`specserve info`)."""
    if model.native is not None:
        screened = model.native_head is not None and model.native_head.screen is not None
        lib = model.native.lib
        wide = ""
        if hasattr(lib, "ss_wide_rows"):
            rows = lib.ss_wide_rows()
            wide = f", wide linears from {rows} rows" if rows else ", narrow linears at every size"
        return f"native ({kind_of(lib)}){wide}{', greedy LM head screened in int8' if screened else ''}"
    why = supports(model) or (_why_not if library() is None else "packing disabled")
    return f"pytorch ({why})"
