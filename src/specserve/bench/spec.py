"""`specserve bench spec`: speculative decoding methods against our own plain decoding.

One loaded target, batch size 1, greedy, EOS respected (outputs are natural answers; a
lossless method gives the same tokens as plain decoding, so the same number of them).
For every prompt, plain decoding runs first and then each method, so drift on a noisy
machine hits all of them alike. Each method keeps one drafter for all prompts of a
repetition (as in serving: the suffix drafter's global history grows with earlier
outputs); drafters are rebuilt at the start of each repetition, after the warm-up, so no
prompt is ever drafted from its own earlier output.

Per category and method: AL (acceptance length = generated tokens / target forwards,
aggregated as total tokens / total forwards), tokens/s (total tokens / total wall) and
speedup over plain (ratio of tokens/s on the same prompts); overall = macro-average of
the per-category speedups and the overall AL.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from specserve.bench.common import (
    DEFAULT_DRAFT_LENGTHS,
    PlainMargins,
    Prompt,
    build_prompts,
    categories_of,
    check_fits,
    first_divergence,
    header_table,
    machine_info,
    plural,
    publish_report,
    raw_jsonl_path,
    select_questions,
    write_record,
)
from specserve.bench.methods import parse_method_list
from specserve.sampling.params import SamplingParams

PLAIN = "plain"
METHODS = ("ngram", "suffix", "draft-model", "layer-skip", "eagle", "medusa")
DEFAULT_DRAFT_LAYERS = 8


@dataclass
class SpecRecord:
    """One timed request (one line of the raw JSONL)."""

    method: str
    spec: str | None  # the `LLM.set_spec` argument (None = plain decoding)
    prompt_id: int
    category: str
    repetition: int
    prompt_tokens: int
    new_tokens: int
    finish_reason: str | None
    wall_s: float
    ttft_s: float | None
    forward_passes: int
    drafted_tokens: int
    accepted_tokens: int
    accepted_per_position: list[int]
    drafted_per_position: list[int]
    draft_time_s: float
    verify_time_s: float
    token_ids: list[int]
    identical_to_plain: bool
    first_divergence: int | None  # first index where the tokens differ from plain's (None: identical)
    divergence_margin: float | None = None  # plain's top-2 logit margin there, teacher-forced (None: unknown)
    near_tie_tolerance: float | None = None  # a divergence with a smaller margin is a numerical near-tie


def parse_methods(text: str | Iterable[str]) -> list[str]:
    """`"ngram,suffix"` -> `["ngram", "suffix"]`: known names, no duplicates, at least one."""
    return parse_method_list(text, METHODS)


def resolve_draft_model(
    llm, draft_model: str | None, draft_layers: int | None, stack: contextlib.ExitStack
) -> tuple[str, str]:
    """(path, description) of the draft model: `draft_model` as given, else the target's first
    `draft_layers` (default 8) layers derived into a temp dir that lives as long as `stack`."""
    if draft_model is not None:
        return draft_model, draft_model
    n_layers = draft_layers if draft_layers is not None else DEFAULT_DRAFT_LAYERS
    target_layers = llm.config.num_layers
    if n_layers > target_layers:
        raise ValueError(f"--draft-layers must be <= the target's {target_layers} layers, got {n_layers}")
    from specserve.model.export import export_truncated

    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="specserve-draft-"))
    print(f"deriving a draft model: the target's first {n_layers} layers -> {tmp}", file=sys.stderr)
    path = export_truncated(llm.model_path, tmp, n_layers)
    return path, f"the target's first {n_layers} of {target_layers} layers (export_truncated, temp dir)"


# ---------------------------------------------------------------- report maths


@dataclass
class Totals:
    requests: int = 0
    tokens: int = 0
    forwards: int = 0
    wall_s: float = 0.0
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @classmethod
    def of(cls, records: Iterable[SpecRecord]) -> Totals:
        t = cls()
        for r in records:
            t.requests += 1
            t.tokens += r.new_tokens
            t.forwards += r.forward_passes
            t.wall_s += r.wall_s
            t.drafted += r.drafted_tokens
            t.accepted += r.accepted_tokens
            t.draft_s += r.draft_time_s
            t.verify_s += r.verify_time_s
        return t

    @property
    def acceptance_length(self) -> float:
        return self.tokens / self.forwards if self.forwards else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def draft_share(self) -> float:
        return self.draft_s / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def verify_share(self) -> float:
        return self.verify_s / self.wall_s if self.wall_s > 0 else math.nan


def _key(r: SpecRecord) -> tuple[int, int]:
    return (r.prompt_id, r.repetition)


def paired(
    records: Sequence[SpecRecord], method: str, category: str | None = None
) -> list[tuple[SpecRecord, SpecRecord]]:
    """(plain, method) records of the same prompt and repetition, optionally of one category."""
    plain = {_key(r): r for r in records if r.method == PLAIN and (category is None or r.category == category)}
    return [
        (plain[_key(r)], r)
        for r in records
        if r.method == method and (category is None or r.category == category) and _key(r) in plain
    ]


def speedup(records: Sequence[SpecRecord], method: str, category: str | None = None) -> float:
    """tokens/s of `method` / tokens/s of plain decoding, on the prompts both ran."""
    pairs = paired(records, method, category)
    if not pairs:
        return math.nan
    base = Totals.of(p for p, _ in pairs).tokens_per_s
    mine = Totals.of(m for _, m in pairs).tokens_per_s
    return mine / base if base > 0 else math.nan


def category_speedups(records: Sequence[SpecRecord], method: str, categories: Sequence[str]) -> dict[str, float]:
    return {cat: speedup(records, method, cat) for cat in categories}


def macro_speedup(records: Sequence[SpecRecord], method: str, categories: Sequence[str]) -> float:
    """Mean over categories of the per-category speedups (NaN categories left out)."""
    values = [s for s in category_speedups(records, method, categories).values() if not math.isnan(s)]
    return statistics.fmean(values) if values else math.nan


def position_acceptance(records: Iterable[SpecRecord]) -> list[tuple[int, int]]:
    """(accepted, drafted) summed per draft position (index 0 = first draft token)."""
    acc: list[int] = []
    dra: list[int] = []
    for r in records:
        for counts, values in ((acc, r.accepted_per_position), (dra, r.drafted_per_position)):
            if len(counts) < len(values):
                counts.extend([0] * (len(values) - len(counts)))
            for j, v in enumerate(values):
                counts[j] += v
    n = max(len(acc), len(dra))
    acc += [0] * (n - len(acc))
    dra += [0] * (n - len(dra))
    return list(zip(acc, dra))


def equivalence(records: Sequence[SpecRecord], method: str) -> tuple[int, int, list[SpecRecord]]:
    """(identical to plain, compared, the records that differ)."""
    mine = [m for _, m in paired(records, method)]
    differ = [r for r in mine if not r.identical_to_plain]
    return len(mine) - len(differ), len(mine), differ


def is_near_tie(r: SpecRecord) -> bool:
    """A divergence whose plain margin is known and below the tolerance (an unknown margin is not)."""
    return r.divergence_margin is not None and r.near_tie_tolerance is not None and r.divergence_margin < r.near_tie_tolerance


def _divergence(r: SpecRecord) -> str:
    margin = "unknown" if r.divergence_margin is None else f"{r.divergence_margin:.3g}"
    return f"{r.category}-{r.prompt_id} (rep {r.repetition}) at token {r.first_divergence}, margin {margin}"


# ---------------------------------------------------------------- report


@dataclass
class SpecBenchResult:
    machine: dict[str, str]
    model: dict[str, Any]
    prompts: list[Prompt]
    methods: list[str]  # without plain
    specs: dict[str, str | None]  # method -> LLM.set_spec argument
    max_tokens: int
    repetitions: int
    warmup: int
    num_spec_tokens: int | None
    adaptive: bool
    records: list[SpecRecord]
    draft_model: str | None = None  # how the draft model was obtained (report line)
    notes: list[str] = field(default_factory=list)
    raw_path: Path | None = None

    @property
    def categories(self) -> list[str]:
        return categories_of(self.prompts) if self.prompts else list(dict.fromkeys(r.category for r in self.records))

    @property
    def all_methods(self) -> list[str]:
        return [PLAIN, *self.methods]


def _f(x: float, fmt: str, suffix: str = "") -> str:
    return "—" if x is None or math.isnan(x) else f"{x:{fmt}}{suffix}"


def _pct(x: float) -> str:
    return _f(x * 100 if not math.isnan(x) else x, ".0f", "%")


def format_report(res: SpecBenchResult) -> str:
    cats = res.categories
    recs = res.records
    k = res.num_spec_tokens if res.num_spec_tokens is not None else DEFAULT_DRAFT_LENGTHS
    rows = [
        (
            "workload",
            (f"Spec-Bench first turns, {plural(len(res.prompts), 'prompt')} ({plural(len(cats), 'category')}), "
            f"chat template, greedy, up to {res.max_tokens} new tokens (EOS respected), batch size 1"),
        ),
        (
            "runs",
            (f"{res.warmup} warm-up per method, {plural(res.repetitions, 'repetition')}; per prompt: plain, then "
            f"{', '.join(res.methods)}; one drafter per method per repetition (state carries across prompts)"),
        ),
        ("draft tokens", f"at most {k} per step, {'adaptive' if res.adaptive else 'fixed'} draft length"),
    ]
    if res.draft_model is not None:
        rows.append(("draft model", res.draft_model))
    lines = header_table("specserve bench spec", res.machine, res.model, rows)
    totals = {m: Totals.of(r for r in recs if r.method == m) for m in res.all_methods}
    by_cat = {
        (c, m): Totals.of(r for r in recs if r.method == m and r.category == c) for c in cats for m in res.all_methods
    }

    def matrix(title: str, methods: list[str], cell, overall, overall_label: str) -> None:
        lines.extend(["", f"### {title}", "", "| category | " + " | ".join(methods) + " |"])
        lines.append("|---|" + "---:|" * len(methods))
        for c in cats:
            lines.append(f"| {c} | " + " | ".join(cell(c, m) for m in methods) + " |")
        lines.append(f"| **{overall_label}** | " + " | ".join(f"**{overall(m)}**" for m in methods) + " |")

    matrix(
        "Speedup over plain decoding (tokens/s ratio on the same prompts)",
        res.methods,
        lambda c, m: _f(speedup(recs, m, c), ".2f", "x"),
        lambda m: _f(macro_speedup(recs, m, cats), ".2f", "x"),
        "overall (mean of categories)",
    )
    matrix(
        "Acceptance length (generated tokens / target forwards)",
        res.all_methods,
        lambda c, m: _f(by_cat[(c, m)].acceptance_length, ".2f"),
        lambda m: _f(totals[m].acceptance_length, ".2f"),
        "overall",
    )
    matrix(
        "Tokens/s (new tokens / wall time of the generate call, prefill included)",
        res.all_methods,
        lambda c, m: _f(by_cat[(c, m)].tokens_per_s, ".1f"),
        lambda m: _f(totals[m].tokens_per_s, ".1f"),
        "overall",
    )

    lines += [
        "",
        "### Per method",
        "",
        ("| method | requests | new tokens | AL | drafted | accepted | acceptance rate | tokens/s | speedup | "
        "TTFT median | drafting | target forwards | identical to plain |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in res.all_methods:
        t = totals[m]
        ttfts = [r.ttft_s for r in recs if r.method == m and r.ttft_s is not None]
        ttft = _f(statistics.median(ttfts) * 1e3, ".0f", " ms") if ttfts else "—"
        same, compared, _ = equivalence(recs, m) if m != PLAIN else (t.requests, t.requests, [])
        sp = "1.00x" if m == PLAIN else _f(macro_speedup(recs, m, cats), ".2f", "x")
        lines.append(
            f"| {m} | {t.requests} | {t.tokens} | {_f(t.acceptance_length, '.2f')} | {t.drafted} | {t.accepted} | "
            f"{_pct(t.acceptance_rate)} | {_f(t.tokens_per_s, '.1f')} | {sp} | {ttft} | {_pct(t.draft_share)} | "
            f"{_pct(t.verify_share)} | {'—' if m == PLAIN else f'{same}/{compared}'} |"
        )
    lines += [
        "",
        ("drafting / target forwards: share of the wall time spent proposing drafts / in target forwards that "
        "verify them (decode steps; prefill is in neither)."),
    ]

    positions = {m: position_acceptance(r for r in recs if r.method == m) for m in res.methods}
    width = max((len(p) for p in positions.values()), default=0)
    if width:
        lines += [
            "",
            "### Acceptance rate per draft position (accepted / drafted at position j)",
            "",
            "| method | " + " | ".join(str(j + 1) for j in range(width)) + " |",
            "|---|" + "---:|" * width,
        ]
        for m, pos in positions.items():
            cells = [_pct(a / d) if d else "—" for a, d in pos] + ["—"] * (width - len(pos))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "### Equivalence with plain decoding",
        "",
        "| method | identical | near-tie divergences | other divergences | verdict | largest near-tie margin |",
        "|---|---:|---:|---:|---|---:|",
    ]
    others: dict[str, list[SpecRecord]] = {}
    for m in res.methods:
        same, compared, differ = equivalence(recs, m)
        ties = [r for r in differ if is_near_tie(r)]
        others[m] = [r for r in differ if not is_near_tie(r)]
        verdict = "**lossless**" if not others[m] else "**NOT lossless**"
        largest = max((r.divergence_margin for r in ties), default=None)
        lines.append(
            f"| {m} | {same}/{compared} | {len(ties)} | {len(others[m])} | {verdict} | {_f(largest, '.3g')} |"
        )
    tolerance = next((r.near_tie_tolerance for r in recs if r.near_tie_tolerance is not None), None)
    lines += [
        "",
        "A divergence is a numerical near-tie when plain decoding's top-2 logit margin at the first differing token "
        "(teacher-forced on plain's own output) is below the tolerance"
        + (f" ({tolerance:g} in this dtype)" if tolerance is not None else "")
        + "; a method is lossless when every divergence is one (a batched verify forward may round differently "
        "from a one-token forward).",
    ]
    for m, bad in others.items():
        if bad:
            lines.append(
                f"- {m}, divergences that are not near-ties: " + "; ".join(_divergence(r) for r in bad[:10])
                + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
            )
    truncated = sum(1 for r in recs if r.method == PLAIN and r.finish_reason == "length")
    if truncated:
        lines.append(
            f"Note: {truncated} of {totals[PLAIN].requests} plain requests stopped at max_tokens {res.max_tokens} "
            "before EOS."
        )
    lines += [f"Note: {n}." for n in res.notes]
    if res.raw_path is not None:
        lines.append(f"Raw per-request records: {res.raw_path}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the run


def _record(method: str, spec: str | None, prompt: Prompt, rep: int, out, wall: float) -> SpecRecord:
    m = out.metrics
    q = prompt.question
    return SpecRecord(
        method=method,
        spec=spec,
        prompt_id=q.question_id,
        category=q.category,
        repetition=rep,
        prompt_tokens=len(prompt.token_ids),
        new_tokens=len(out.token_ids),
        finish_reason=out.finish_reason,
        wall_s=wall,
        ttft_s=m.ttft,
        forward_passes=m.forward_passes,
        drafted_tokens=m.drafted_tokens,
        accepted_tokens=m.accepted_tokens,
        accepted_per_position=list(m.accepted_per_position),
        drafted_per_position=list(m.drafted_per_position),
        draft_time_s=m.draft_time,
        verify_time_s=m.verify_time,
        token_ids=list(out.token_ids),
        identical_to_plain=True,
        first_divergence=None,
    )


def run_spec_bench(
    model: str | None = None,
    dtype: str | None = None,
    methods: str | Iterable[str] = METHODS,
    draft_model: str | None = None,
    draft_layers: int | None = None,
    n_per_category: int = 5,
    max_tokens: int = 256,
    repetitions: int = 1,
    warmup: int = 1,
    num_spec_tokens: int | None = None,
    adaptive: bool = True,
    out_dir: str | os.PathLike[str] = "bench_out",
    questions_path: str | os.PathLike[str] | None = None,
    categories: Iterable[str] | None = None,
    stdout: IO[str] | None = None,
) -> SpecBenchResult:
    """Run the benchmark, print the Markdown report to `stdout` and return the result.

    Bad arguments raise ValueError / FileNotFoundError naming the flag, before any timing.
    """
    from specserve.api import LLM

    names = parse_methods(methods)
    if max_tokens < 1 or repetitions < 1 or warmup < 0:
        raise ValueError("need max_tokens >= 1, repetitions >= 1 and warmup >= 0")
    if num_spec_tokens is not None and not 1 <= num_spec_tokens <= 32:
        raise ValueError(f"--num-spec-tokens must be in [1, 32], got {num_spec_tokens}")
    if draft_model is not None and draft_layers is not None:
        raise ValueError("--draft-model and --draft-layers exclude each other")
    if draft_model is not None and not os.path.exists(draft_model):
        raise FileNotFoundError(f"--draft-model: path does not exist: {draft_model}")
    if draft_layers is not None and draft_layers < 1:
        raise ValueError(f"--draft-layers must be >= 1, got {draft_layers}")
    questions = select_questions(questions_path, n_per_category, categories)
    notes: list[str] = []
    if "draft-model" not in names and (draft_model is not None or draft_layers is not None):
        notes.append("--draft-model/--draft-layers ignored: draft-model is not among the methods")

    with contextlib.ExitStack() as stack:
        llm = LLM(model, dtype=dtype)
        prompts = build_prompts(llm, questions)
        check_fits(prompts, max_tokens, llm.max_model_len)

        draft_desc = None
        if "draft-model" in names:
            draft_model, draft_desc = resolve_draft_model(llm, draft_model, draft_layers, stack)
        specs: dict[str, str | None] = {PLAIN: None}
        for name in names:
            specs[name] = f"draft-model:{draft_model}" if name == "draft-model" else name

        setups: dict[str, object] = {}

        def build_all() -> None:
            """Fresh drafters (no history) for every method, built before anything is timed."""
            for method, spec in specs.items():
                try:
                    setups[method] = llm.build_spec(spec, num_spec_tokens if spec is not None else None, adaptive)
                except (ValueError, OSError) as exc:
                    flag = "--draft-model" if method == "draft-model" else "--methods"
                    raise ValueError(f"{flag}: {method} cannot be used with this model: {exc}") from None

        def use(method: str) -> None:
            llm.use_spec(setups[method])

        build_all()

        params = SamplingParams(max_tokens=max_tokens)  # greedy, EOS respected

        def run(method: str, prompt: Prompt):
            use(method)
            llm.reset_prefix_cache()  # every method prefills the prompt itself
            started = time.perf_counter()
            out = llm.generate([prompt.token_ids], params)[0]
            return out, time.perf_counter() - started

        order = [PLAIN, *names]
        raw_path = raw_jsonl_path(out_dir, "spec")
        records: list[SpecRecord] = []
        margins = PlainMargins(llm)
        total = len(order) * (warmup + repetitions * len(prompts))
        with open(raw_path, "w", encoding="utf-8") as raw, tqdm(
            total=total, desc="bench spec", file=sys.stderr
        ) as bar:
            for method in order:
                bar.set_postfix_str(f"{method} warm-up")
                for _ in range(warmup):
                    run(method, prompts[0])
                    bar.update()
            for rep in range(repetitions):
                # each method keeps one drafter across the prompts of a repetition (the
                # suffix drafter's global history grows as in serving); a new repetition
                # starts fresh, so no prompt is drafted from its own earlier output
                build_all()
                for i, prompt in enumerate(prompts):
                    plain_ids: list[int] = []
                    for method in order:
                        bar.set_postfix_str(f"rep {rep + 1}/{repetitions} prompt {i + 1}/{len(prompts)} {method}")
                        out, wall = run(method, prompt)
                        rec = _record(method, specs[method], prompt, rep, out, wall)
                        if method == PLAIN:
                            plain_ids = rec.token_ids
                        else:
                            rec.first_divergence = first_divergence(plain_ids, rec.token_ids)
                            rec.identical_to_plain = rec.first_divergence is None
                            rec.near_tie_tolerance = margins.tolerance
                            if rec.first_divergence is not None:  # untimed, after the timed run
                                rec.divergence_margin = margins.margin(
                                    prompt, plain_ids, rec.first_divergence, setups[PLAIN]
                                )
                        records.append(rec)
                        write_record(raw, rec)
                        bar.update()
        llm.set_spec(None)
        result = SpecBenchResult(
            machine=machine_info(llm),
            model=llm.info(),
            prompts=prompts,
            methods=names,
            specs=specs,
            max_tokens=max_tokens,
            repetitions=repetitions,
            warmup=warmup,
            num_spec_tokens=num_spec_tokens,
            adaptive=adaptive,
            records=records,
            draft_model=draft_desc,
            notes=notes,
            raw_path=raw_path,
        )
    publish_report(format_report(result), raw_path, stdout)
    return result
