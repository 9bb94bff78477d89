"""`specserve bench report`: raw harness JSONL (and optionally throughput JSONL) -> Markdown + PNG plots.

Pure post-processing: everything comes from the files (`RUN.jsonl` and its `RUN.meta.json`).

- tokens/s = new tokens / wall time of the requests (prefill included), pooled;
  per repetition, then median and min over repetitions.
- speedup of A over B = tokens/s of A / tokens/s of B on the (prompt, repetition) pairs both ran.
- AL (acceptance length, Spec-Bench #MAT) = new tokens / target forwards, pooled.
- equivalence: each output against our plain decoding of the same prompt and repetition.
  A divergence is a near-tie when our plain run's top-2 logit margin there is below
  `specserve.equivalence.NEAR_TIE` for the dtype; one of ours is "lossless" only if every
  divergence is a near-tie. Peers run other kernels (and llama.cpp the quantized
  weights), so their agreement is shown for information only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specserve.bench.common import DEFAULT_DRAFT_LENGTHS
from specserve.bench.methods import PEER_METHODS
from specserve.bench.records import PLAIN, RequestRecord, RunMeta, iter_jsonl
from specserve.equivalence import first_divergence

MATPLOTLIB_MISSING = "plots not drawn: matplotlib is not installed (pip install 'specserve[bench]')"


# ---------------------------------------------------------------- maths


def _key(r: RequestRecord) -> tuple[str, int]:
    return (r.prompt_id, r.repetition)


def tokens_per_s(records: Iterable[RequestRecord]) -> float:
    records = list(records)
    wall = sum(r.wall_s for r in records)
    return sum(r.new_tokens for r in records) / wall if wall > 0 else math.nan


def acceptance_length(records: Iterable[RequestRecord]) -> float:
    records = list(records)
    forwards = sum(r.forward_passes for r in records)
    return sum(r.new_tokens for r in records) / forwards if forwards else math.nan


def speedup(records: Sequence[RequestRecord], method: str, base: str) -> float:
    """tokens/s of `method` / tokens/s of `base` on the (prompt, repetition) pairs both ran."""
    base_keys = {_key(r) for r in records if r.method == base}
    mine = [r for r in records if r.method == method and _key(r) in base_keys]
    keys = {_key(r) for r in mine}
    theirs = [r for r in records if r.method == base and _key(r) in keys]
    if not mine:
        return math.nan
    return tokens_per_s(mine) / tokens_per_s(theirs)


def per_repetition_rates(records: Sequence[RequestRecord], method: str) -> list[float]:
    reps = sorted({r.repetition for r in records if r.method == method})
    return [tokens_per_s(r for r in records if r.method == method and r.repetition == k) for k in reps]


def position_acceptance(records: Iterable[RequestRecord]) -> list[float]:
    """Accepted / drafted at each draft position (index 0 = first draft token)."""
    acc: list[int] = []
    dra: list[int] = []
    for r in records:
        for counts, values in ((acc, r.accepted_per_position or []), (dra, r.drafted_per_position or [])):
            counts.extend([0] * (len(values) - len(counts)))
            for j, v in enumerate(values):
                counts[j] += v
    acc += [0] * (len(dra) - len(acc))
    return [acc[j] / d if d else math.nan for j, d in enumerate(dra)]


@dataclass
class Equivalence:
    compared: int
    identical: int
    near_ties: int
    not_near_ties: list[str]  # "writing-81 (rep 0) at token 12, margin 1.5" (margin unknown counts here)

    @property
    def lossless(self) -> bool:
        return not self.not_near_ties


def equivalence(records: Sequence[RequestRecord], method: str) -> Equivalence:
    """Every output of `method` against our plain output of the same prompt and repetition."""
    plain = {_key(r): r for r in records if r.method == PLAIN}
    eq = Equivalence(0, 0, 0, [])
    for r in records:
        if r.method != method or _key(r) not in plain:
            continue
        eq.compared += 1
        index = first_divergence(plain[_key(r)].token_ids, r.token_ids)
        if index is None:
            eq.identical += 1
            continue
        known = r.first_divergence == index and r.divergence_margin is not None and r.near_tie_tolerance is not None
        if known and r.divergence_margin < r.near_tie_tolerance:
            eq.near_ties += 1
        else:
            margin = f"{r.divergence_margin:.3g}" if known else "unknown"
            eq.not_near_ties.append(f"{r.prompt_id} (rep {r.repetition}) at token {index}, margin {margin}")
    return eq


# ---------------------------------------------------------------- formatting


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "—" if x is None or math.isnan(x) else f"{x:{spec}}{suffix}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def ordered(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


@dataclass
class HarnessData:
    records: list[RequestRecord]
    metas: list[RunMeta]

    @property
    def methods(self) -> list[str]:
        from_meta = [m for meta in self.metas for m in meta.methods]
        return ordered([*from_meta, *(r.method for r in self.records)])

    @property
    def categories(self) -> list[str]:
        return ordered(r.category for r in self.records)

    @property
    def peers(self) -> list[str]:
        return [m for m in self.methods if m in PEER_METHODS]

    def of(self, method: str, category: str | None = None) -> list[RequestRecord]:
        return [r for r in self.records if r.method == method and (category is None or r.category == category)]

    def in_category(self, category: str) -> list[RequestRecord]:
        return [r for r in self.records if r.category == category]


def header_lines(data: HarnessData) -> list[str]:
    if not data.metas:
        return ["No run metadata (.meta.json) found: machine and configuration unknown.", ""]
    meta = data.metas[0]
    rows = [(k, str(v)) for k, v in meta.machine.items()]
    rows += [("model", f"{Path(str(meta.model.get('model', '?'))).name} ({meta.model.get('family', '?')})")]
    cfg = meta.config
    eos = "ignored (every request runs to max tokens)" if cfg.get("ignore_eos") else "respected (the target's EOS ids)"
    rows += [
        ("prompts", (f"{cfg.get('prompts')} (Spec-Bench, chat template; second MT-Bench turns: "
                    f"{'yes, after our plain first answer' if cfg.get('multi_turn') else 'no'})")),
        ("decoding", f"greedy, batch size 1, at most {cfg.get('max_tokens')} new tokens, EOS {eos}"),
        ("runs", (f"{cfg.get('warmup')} warm-up per method, {cfg.get('repetitions')} repetitions; per prompt our "
                 "plain decoding first, then every other method")),
        ("draft length", (f"ours: {cfg.get('num_spec_tokens') or DEFAULT_DRAFT_LENGTHS}"
                         f"{', adaptive' if cfg.get('adaptive') else ', fixed'}; peers: 10 (their default)")),
    ]
    if cfg.get("draft_model"):
        rows.append(("draft model", str(cfg["draft_model"])))
    return table(["", ""], rows) + [""]


def summary_lines(data: HarnessData) -> list[str]:
    recs = data.records
    peers = [p for p in data.peers if data.of(p)]
    header = ["method", "requests", "new tokens", "tokens/s median", "tokens/s min", "AL", "TTFT median",
              "speedup vs plain", *(f"vs {p}" for p in peers)]
    rows = []
    for m in data.methods:
        mine = data.of(m)
        if not mine:
            continue
        rates = per_repetition_rates(recs, m)
        ttfts = [r.ttft_s for r in mine if r.ttft_s is not None]
        rows.append([
            m, str(len(mine)), str(sum(r.new_tokens for r in mine)), fmt(statistics.median(rates), ".1f"),
            fmt(min(rates), ".1f"), fmt(acceptance_length(mine), ".2f"),
            fmt(statistics.median(ttfts) * 1e3, ".0f", " ms") if ttfts else "—",
            fmt(speedup(recs, m, PLAIN), ".2f", "x"), *(fmt(speedup(recs, m, p), ".2f", "x") for p in peers),
        ])
    return ["### Overall", "", *table(header, rows), ""]


def category_matrix(data: HarnessData, title: str, cell: Callable[[list[RequestRecord], str], str]) -> list[str]:
    methods = [m for m in data.methods if data.of(m)]
    rows = [[c, *(cell(data.in_category(c), m) for m in methods)] for c in data.categories]
    rows.append(["**all**", *(f"**{cell(data.records, m)}**" for m in methods)])
    return [f"### {title}", "", *table(["category", *methods], rows), ""]


def position_lines(data: HarnessData) -> list[str]:
    rates = {m: position_acceptance(data.of(m)) for m in data.methods if m != PLAIN}
    rates = {m: r for m, r in rates.items() if r}
    width = max((len(r) for r in rates.values()), default=0)
    if not width:
        return []
    rows = [[m, *(fmt(x * 100, ".0f", "%") for x in r), *["—"] * (width - len(r))] for m, r in rates.items()]
    header = ["method", *(str(j + 1) for j in range(width))]
    return ["### Acceptance rate per draft position (accepted / drafted at position j)", "", *table(header, rows), ""]


def equivalence_lines(data: HarnessData) -> list[str]:
    lines = ["### Output equivalence with our plain decoding", ""]
    rows = []
    for m in data.methods:
        if m == PLAIN or not data.of(m):
            continue
        eq = equivalence(data.records, m)
        if m in PEER_METHODS:
            verdict = "for information (other kernels)"
        else:
            verdict = "**lossless**" if eq.lossless else "**NOT lossless**"
        bad = "; ".join(eq.not_near_ties[:5]) + (f" and {len(eq.not_near_ties) - 5} more" if len(eq.not_near_ties) > 5 else "")
        rows.append([m, f"{eq.identical}/{eq.compared}", str(eq.near_ties), str(len(eq.not_near_ties)), verdict, bad or "—"])
    lines += table(["method", "identical", "near-tie divergences", "other divergences", "verdict", "first of the others"], rows)
    lines += ["", ("A divergence is a near-tie when our plain run's top-2 logit margin at the first differing token is "
              "below the tolerance of `specserve.equivalence` (0.5 in bf16, 1e-3 in fp32); a method of ours is lossless "
              "only if every divergence is one. Peers round differently (other kernels; llama.cpp computes on the "
              "quantized weights), so their agreement is not judged."), ""]
    return lines


def notes_lines(data: HarnessData) -> list[str]:
    lines = []
    for meta in data.metas:
        lines += [f"- {why} ({m} not measured)" for m, why in meta.missing_peers.items()]
        lines += [f"- {n}" for n in meta.notes]
    return ["### Notes", "", *ordered(lines), ""] if lines else []


def harness_markdown(data: HarnessData, images: dict[str, str]) -> list[str]:
    lines = header_lines(data) + summary_lines(data) + notes_lines(data)
    lines += category_matrix(data, "Speedup over our plain decoding", lambda rs, m: fmt(speedup(rs, m, PLAIN), ".2f", "x"))
    lines += category_matrix(data, "Acceptance length (new tokens / target forwards)",
                             lambda rs, m: fmt(acceptance_length([r for r in rs if r.method == m]), ".2f"))
    lines += category_matrix(data, "Tokens/s", lambda rs, m: fmt(tokens_per_s(r for r in rs if r.method == m), ".1f"))
    lines += position_lines(data) + equivalence_lines(data)
    lines += [f"![{name}]({path})" for name, path in images.items() if name != "throughput"] + [""]
    return lines


# ---------------------------------------------------------------- throughput JSONL


def throughput_rates(rows: Sequence[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """method -> concurrency -> median over repetitions of tokens / level wall time."""
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("level_wall_s"):
            runs.setdefault((row["method"], row["concurrency"], row["repetition"]), []).append(row)
    per: dict[str, dict[int, list[float]]] = {}
    for (method, level, _), rs in runs.items():
        per.setdefault(method, {}).setdefault(level, []).append(sum(r["new_tokens"] for r in rs) / rs[0]["level_wall_s"])
    return {m: {c: statistics.median(v) for c, v in sorted(levels.items())} for m, levels in per.items()}


def throughput_lines(rates: dict[str, dict[int, float]], image: str | None) -> list[str]:
    if not rates:
        return ["### Throughput vs concurrency", "", ("The throughput file has no per-level wall time "
                "(`level_wall_s`): rerun `specserve bench throughput`."), ""]
    levels = sorted({c for r in rates.values() for c in r})
    rows = [[m, *(fmt(r.get(c, math.nan), ".1f") for c in levels)] for m, r in rates.items()]
    lines = ["### Throughput vs concurrency (generated tokens/s, median over repetitions)", ""]
    lines += table(["method", *(f"c={c}" for c in levels)], rows) + [""]
    return lines + ([f"![throughput]({image})", ""] if image else [])


# ---------------------------------------------------------------- the report


def load_harness(paths: Sequence[str | Path]) -> HarnessData:
    from specserve.bench.records import read_meta, read_records

    metas = [m for m in (read_meta(p) for p in paths) if m is not None]
    return HarnessData(read_records(paths), metas)


def write_report(
    harness_paths: Sequence[str | Path],
    out_md: str | Path,
    throughput_paths: Sequence[str | Path] = (),
    img_dir: str | Path | None = None,
    title: str = "specserve benchmark report",
    preamble: Sequence[str] = (),
) -> str:
    """Write the Markdown report to `out_md` and its plots to `img_dir` (default: `OUT_DIR/img`)."""
    from specserve.bench import plots

    out_md = Path(out_md)
    img_dir = Path(img_dir) if img_dir is not None else out_md.parent / "img"
    data = load_harness(harness_paths)
    if not data.records:
        raise ValueError("no harness records in the given files")
    tp_rates = throughput_rates([row for p in throughput_paths for row in iter_jsonl(p)])
    images: dict[str, Path] = {}
    drawn = plots.available()
    if drawn:
        images = plots.draw_all(data, tp_rates, img_dir)
    rel = {name: _relative(path, out_md.parent) for name, path in images.items()}
    lines = [f"# {title}", "", *preamble]
    lines += ["## Single-request latency: every method on the same prompts", ""] + harness_markdown(data, rel)
    if throughput_paths:
        lines += throughput_lines(tp_rates, rel.get("throughput"))
    if not drawn:
        lines += [f"Note: {MATPLOTLIB_MISSING}.", ""]
    text = "\n".join(lines).rstrip() + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text, encoding="utf-8")
    return text


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path, start)).as_posix()
