"""`specserve bench forward`: target forward time by batch shape, native layers vs PyTorch.

One forward of S sequences x N new tokens each over C cached tokens per sequence (the
shape of a verification step: every row's logits are computed), through `ModelRunner`
on a scratch KV cache, for each decoder-layer path in one run on one loaded model:

- `native`: the C++ AMX layers and LM head (bf16 K/V pool), where this CPU and model
  have them;
- `pytorch`: the same model with the native kernels switched off: PyTorch layers and
  the oneDNN LM head, fp32 K/V pool on the CPU (as `SPECSERVE_NATIVE=0` loads it).

Each cell is the best of `--repetitions` timed forwards after one untimed one. The
report prints milliseconds per forward for each path and, with both, the ratio
pytorch / native. The cost of extra rows at fixed S is what speculation pays per drafted
token; the load-aware policy measures the same table for its cost model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import torch

from specserve.bench.common import header_table, machine_info, publish_report, raw_jsonl_path, write_record
from specserve.cache import KVCache
from specserve.engine.runner import ForwardItem, ModelRunner
from specserve.model import native
from specserve.model.cpu_kernels import PackedLinear, packing_available
from specserve.spec import timed_forwards

PATHS = ("native", "pytorch")


@dataclass
class ForwardRecord:
    path: str
    context: int
    seqs: int
    tokens: int  # new tokens per sequence
    best_ms: float
    median_ms: float


def parse_ints(text: str, flag: str, low: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < low for v in values):
        raise ValueError(f"{flag}: expected integers >= {low}, got {text!r}")
    return sorted(set(values))


def parse_paths(text: str) -> list[str]:
    paths = [x.strip() for x in text.split(",") if x.strip()]
    bad = [p for p in paths if p not in PATHS]
    if not paths or bad:
        raise ValueError(f"--paths: choose from {', '.join(PATHS)}, got {text!r}")
    return list(dict.fromkeys(paths))


class ScratchBatch:
    """`seqs` sequences of `context` real (random-token) cached tokens on a scratch cache."""

    @torch.inference_mode()
    def __init__(self, model, kv_dtype: torch.dtype, context: int, seqs: int, max_tokens: int) -> None:
        cfg = model.config
        self.model, self.context = model, context
        cache = KVCache(cfg.num_layers, seqs, context + max_tokens, cfg.num_kv_heads, cfg.head_dim, kv_dtype,
                        model.device)
        self.runner = ModelRunner(model, cache)
        self.gen = torch.Generator().manual_seed(0)
        self.slots = [cache.allocate() for _ in range(seqs)]
        for slot in self.slots:  # attention over real keys, not zeros
            prefix = torch.randint(0, cfg.vocab_size, (context,), generator=self.gen).tolist()
            self.runner.forward([ForwardItem(slot, 0, prefix, logits_from=None)])
            cache.commit(slot, context)

    def time(self, seqs: int, tokens: int, repetitions: int) -> list[float]:
        """Seconds of `repetitions` forwards (after one untimed) of the first `seqs`
        sequences with `tokens` new tokens each, all rows' logits kept."""
        vocab = self.model.config.vocab_size
        items = [
            ForwardItem(slot, self.context, torch.randint(0, vocab, (tokens,), generator=self.gen).tolist(),
                        logits_from=0)
            for slot in self.slots[:seqs]
        ]
        return timed_forwards(self.runner, items, repetitions)


def run_forward_bench(
    model: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    paths: Sequence[str] = PATHS,
    contexts: Sequence[int] = (128, 512),
    seqs: Sequence[int] = (1, 4, 16),
    tokens: Sequence[int] = (1, 5, 9, 17),
    repetitions: int = 3,
    out_dir: str = "bench_out",
    stdout: IO[str] | None = None,
) -> str:
    from specserve.api import LLM

    stdout = stdout or sys.stdout
    llm = LLM(model=model, dtype=dtype, device=device, max_num_seqs=1, max_model_len=max(contexts) + max(tokens) + 1)
    target = llm.engine.runner.model
    layers, head, lm_head = target.native, target.native_head, target.lm_head
    torch_head = lm_head
    if head is not None and packing_available(target.dtype, target.device):
        torch_head = PackedLinear(lm_head)  # the PyTorch path's LM head, as SPECSERVE_NATIVE=0 loads it
    skipped = {}
    if "native" in paths and layers is None:
        skipped["native"] = native.describe(target)
    run_paths = [p for p in paths if p not in skipped]
    raw_path = raw_jsonl_path(out_dir, "forward")
    records: list[ForwardRecord] = []
    started = time.perf_counter()
    try:
        with open(raw_path, "w", encoding="utf-8") as raw:
            for path in run_paths:
                target.native, target.native_head, target.lm_head = (
                    (layers, head, lm_head) if path == "native" else (None, None, torch_head)
                )
                for context in contexts:
                    batch = ScratchBatch(target, native.kv_dtype(target), context, max(seqs), max(tokens))
                    for s in seqs:
                        for n in tokens:
                            times = sorted(batch.time(s, n, repetitions))
                            rec = ForwardRecord(path, context, s, n, 1000 * times[0], 1000 * times[len(times) // 2])
                            write_record(raw, rec)
                            records.append(rec)
                            print(f"  {path} context {context}: {s} x {n}: {rec.best_ms:.1f} ms", file=sys.stderr)
    finally:
        target.native, target.native_head, target.lm_head = layers, head, lm_head
    report = format_report(llm, records, run_paths, skipped, contexts, seqs, tokens, repetitions,
                           time.perf_counter() - started)
    publish_report(report, raw_path, stdout)
    return report


def format_report(llm, records, paths, skipped, contexts, seqs, tokens, repetitions, elapsed) -> str:
    by = {(r.path, r.context, r.seqs, r.tokens): r.best_ms for r in records}
    rows = [
        ("shape", "S sequences x N new tokens each over C cached tokens, every row's logits"),
        ("paths", ", ".join(paths) + "".join(f"; {p} skipped: {why}" for p, why in skipped.items())),
        ("repetitions", f"{repetitions} timed forwards per cell after one untimed, best shown"),
        ("wall time", f"{elapsed / 60:.1f} min"),
    ]
    lines = header_table("Forward time by batch shape", machine_info(llm), llm.info(), rows)
    both = len(paths) == 2
    for context in contexts:
        lines += ["", f"### {context} cached tokens per sequence (ms per forward"
                  + (": native / pytorch, and pytorch over native" if both else "") + ")", ""]
        lines.append("| sequences | " + " | ".join(f"{n} token{'s' if n > 1 else ''}" for n in tokens) + " |")
        lines.append("|---:|" + "---:|" * len(tokens))
        for s in seqs:
            cells = []
            for n in tokens:
                vals = [by[(p, context, s, n)] for p in paths]
                cell = " / ".join(f"{v:.1f}" for v in vals)
                if both:
                    cell += f" ({vals[1] / vals[0]:.2f}x)"
                cells.append(cell)
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if both:
        lines += ["", "Cells: native ms / pytorch ms (pytorch over native: how many times faster the native path is)."]
    return "\n".join(lines) + "\n"
