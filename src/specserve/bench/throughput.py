"""`specserve bench throughput`: offline throughput under continuous batching.

At each concurrency level, requests (Spec-Bench first turns, chat template, greedy)
are kept `concurrency` in flight: a new one joins as soon as one finishes, so the batch
stays full and requests join and leave at every step. Methods, measured side by side
in one run on one loaded model:

- `off`: plain decoding;
- `<drafter>`: that drafter with a fixed draft length (`--num-spec-tokens`);
- `<drafter>@B`: that drafter with a fixed draft length of B;
- `<drafter>+load-aware`: the drafter with load-aware draft lengths (per step, the
  lengths that maximise expected tokens per second from a measured forward cost model
  and per-sequence acceptance estimates; zero when speculation would slow the batch);
- `oracle:<drafter>[@B]`: an upper bound, not a method: the drafter at its fixed length,
  its proposals cut to the drafts verification will accept (known from `off`'s outputs,
  `specserve.bench.oracle`). A draft-length policy over that drafter beats it by no more
  than the drafting time a smaller length saves.

Throughput = generated tokens / wall time of the level (TTFT included). Every level of
every method runs the same requests in the same order; each (level, method) pair runs
`--repetitions` times, interleaved with the other methods' runs, and reports the median
and the min. Greedy outputs are compared
with the `off` run at the same level, so a method that changes outputs shows up in
the report. Peak resident memory of the process is reported at the end.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from tqdm import tqdm

from specserve.bench.common import (
    Prompt,
    build_prompts,
    check_fits,
    header_table,
    machine_info,
    publish_report,
    raw_jsonl_path,
    select_questions,
    write_record,
)
from specserve.bench.oracle import OracleDrafter
from specserve.equivalence import first_divergence
from specserve.sampling.params import SamplingParams

LEVELS = (1, 2, 4, 8, 16, 32)
# requests per level unless --requests says otherwise (at least 2 x the level): two per
# Spec-Bench category, so low concurrency is not measured on a few prompts of one category
MIN_REQUESTS = 26
LOAD_AWARE = "+load-aware"
ORACLE = "oracle:"


@dataclass
class ThroughputRecord:
    """One request of one (method, concurrency, repetition) run."""

    method: str
    concurrency: int
    repetition: int
    prompt_id: str
    category: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float | None
    latency_s: float | None
    forward_passes: int
    drafted_tokens: int
    accepted_tokens: int
    preemptions: int
    token_ids: list[int]
    level_wall_s: float | None = None  # wall time of the whole (method, concurrency, repetition) run


@dataclass
class LevelResult:
    method: str
    concurrency: int
    tokens_per_s: list[float]  # one per repetition
    acceptance_length: float
    identical: int  # requests whose tokens equal the `off` run's
    requests: int

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_s)

    @property
    def min(self) -> float:
        return min(self.tokens_per_s)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--concurrency takes comma-separated ints, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency levels must be >= 1, got {text!r}")
    return levels


def split_method(method: str, num_spec_tokens: int | None) -> tuple[str | None, int | None, bool, bool]:
    """(spec, fixed draft length, load-aware, oracle) of a checked `--methods` entry."""
    if method == "off":
        return None, None, False, False
    oracle = method.startswith(ORACLE)
    spec = method.removeprefix(ORACLE)
    head, _, budget = spec.rpartition("@")
    if head and budget.isdigit():
        return head, int(budget), False, oracle
    adaptive = spec.endswith(LOAD_AWARE)
    return spec.removesuffix(LOAD_AWARE), num_spec_tokens, adaptive, oracle


def parse_methods(text: str) -> list[str]:
    from specserve.spec import SPEC_METHODS, hybrid_error, split_hybrid

    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m == "off":
            continue
        spec, budget, adaptive, oracle = split_method(m, 8)
        if m.startswith(ORACLE) and (adaptive or m == ORACLE + "off"):
            raise ValueError(f"--methods: {m!r}: an oracle wraps a drafter at a fixed draft length (oracle:DRAFTER[@B])")
        if budget is not None and not 1 <= budget <= 32:
            raise ValueError(f"--methods: {m!r}: the draft length after @ must be in [1, 32]")
        why = hybrid_error(spec)
        if why is not None:
            raise ValueError(f"--methods: {why}")
        if split_hybrid(spec)[1].split(":")[0] not in {name.split(":")[0].split("[")[0] for name in SPEC_METHODS}:
            raise ValueError(
                f"--methods: unknown method {m!r}; use off, a drafter ({', '.join(SPEC_METHODS)}), "
                f"a drafter with @LENGTH or {LOAD_AWARE}, or {ORACLE}DRAFTER[@LENGTH]"
            )
    # off first (the reference outputs come from its first run), each method once
    return ["off"] + [m for m in dict.fromkeys(methods) if m != "off"]


def interleave_categories(prompts: Sequence[Prompt]) -> list[Prompt]:
    """Round-robin over the categories (in first-seen order), so every prefix of the list
    mixes them: `a1 a2 b1 b2 c1` -> `a1 b1 c1 a2 b2`."""
    by_category: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_category.setdefault(p.question.category, []).append(p)
    columns = list(by_category.values())
    return [col[i] for i in range(max(map(len, columns), default=0)) for col in columns if i < len(col)]


def prompt_index(request_id: str) -> int:
    """The prompt a `run_level` request id stands for (its position in the level's prompts)."""
    return int(request_id.split("-")[2])


def use_method(llm, method: str, num_spec_tokens: int | None, truth) -> None:
    """Install a checked `--methods` entry's drafter and policy. An oracle's proposals are cut
    to `truth[prompt index]`, the greedy outputs of `off` (`run_level`'s request ids)."""
    spec, budget, adaptive, oracle = split_method(method, num_spec_tokens)
    llm.set_spec(spec, num_spec_tokens=budget, adaptive=adaptive)
    if oracle:
        if truth is None:
            raise ValueError(f"{method}: an oracle row needs off's outputs first")
        llm.engine.drafter = OracleDrafter(llm.engine.drafter, lambda rid: truth[prompt_index(rid)])


def run_level(llm, prompts: Sequence[Prompt], params: SamplingParams, concurrency: int):
    """Closed loop at `concurrency` in flight; returns (finished sequences in prompt order, wall s).
    Request ids are `tp-{concurrency}-{prompt index}-{ns}` (`prompt_index`)."""
    engine = llm.engine
    pending = list(range(len(prompts)))
    live: dict[int, object] = {}
    done: dict[int, object] = {}
    t0 = time.perf_counter()
    while pending or live:
        while pending and len(live) < concurrency:
            i = pending.pop(0)
            live[i] = engine.add_request(prompts[i].token_ids, params, request_id=f"tp-{concurrency}-{i}-{time.perf_counter_ns()}")
        engine.step()
        for i, seq in list(live.items()):
            if seq.finished:
                done[i] = live.pop(i)
                engine.requests.pop(seq.request_id, None)
    wall = time.perf_counter() - t0
    return [done[i] for i in range(len(prompts))], wall


SYSTEM_PROMPT = (
    "You are the support assistant of a hardware store. Policies: answer politely and briefly; "
    "recommend only products from the catalogue; never promise delivery dates; ask for the order "
    "number before discussing an order; refunds are possible within thirty days with a receipt; "
    "tools with a motor carry a two-year warranty; paint is mixed on request and cannot be returned. "
)
PREFIX_QUESTIONS = ("Do you sell ladders?", "Can I return paint?", "How long is the drill warranty?", "Where is my order?")


def prefix_cache_ttft(llm, target_tokens: int = 1000) -> tuple[int, float, list[float]]:
    """TTFT of requests sharing a ~`target_tokens`-token system prompt, one after another:
    (system prompt tokens, first request's TTFT, later requests' TTFTs)."""
    llm.reset_prefix_cache()
    system = SYSTEM_PROMPT
    while len(llm.chat_prompt([{"role": "system", "content": system}])) < target_tokens:
        system += SYSTEM_PROMPT
    n_system = len(llm.chat_prompt([{"role": "system", "content": system}]))
    ttfts = []
    for q in PREFIX_QUESTIONS:
        out = llm.chat([{"role": "system", "content": system}, {"role": "user", "content": q}], SamplingParams(max_tokens=4))[0]
        ttfts.append(out.metrics.ttft)
    return n_system, ttfts[0], ttfts[1:]


def peak_rss_mib() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return usage / 1024 if sys.platform != "darwin" else usage / 2**20


def run_throughput_bench(
    model: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    methods: Sequence[str] = ("off", "ngram", "suffix", "ngram" + LOAD_AWARE, "suffix" + LOAD_AWARE),
    levels: Sequence[int] = LEVELS,
    requests_per_level: int | None = None,
    max_tokens: int = 128,
    num_spec_tokens: int = 8,
    repetitions: int = 1,
    questions_path: str | None = None,
    out_dir: str = "bench_out",
    stdout: IO[str] | None = None,
) -> str:
    from specserve.api import LLM

    stdout = stdout or sys.stdout
    max_level = max(levels)
    llm = LLM(model=model, dtype=dtype, device=device, max_num_seqs=max_level, max_model_len=2048)
    wanted = max(requests_per_level or MIN_REQUESTS, 2 * max_level)
    per_category = -(-wanted // 13)
    questions = select_questions(questions_path, per_category)
    prompts = interleave_categories([p for p in build_prompts(llm, questions) if len(p.token_ids) <= 1024])[:wanted]
    check_fits(prompts, max_tokens, llm.max_model_len)
    params = SamplingParams(max_tokens=max_tokens)
    raw_path = raw_jsonl_path(out_dir, "throughput")
    results: list[LevelResult] = []
    started = time.perf_counter()
    # warm-up: one short request, so start-up costs stay out of the figures
    llm.generate([prompts[0].token_ids], SamplingParams(max_tokens=8))
    prefix = prefix_cache_ttft(llm)
    with open(raw_path, "w", encoding="utf-8") as raw:
        total = len(levels) * len(methods) * repetitions
        bar = tqdm(total=total, desc="throughput", unit="run", file=sys.stderr, leave=False)
        for level in levels:
            n = max(requests_per_level or MIN_REQUESTS, 2 * level)
            level_prompts = prompts[:n]
            reference: list[list[int]] | None = None
            runs = {m: {"rates": [], "tokens": 0, "forwards": 0, "identical": 0} for m in methods}
            # repetitions interleave the methods (off, A, B, off, A, B, ...), so drift on a shared
            # machine lands on all of them; each run gets a fresh drafter and policy, so none
            # drafts from a global history holding its own earlier run's outputs
            for rep in range(repetitions):
                for method in methods:
                    use_method(llm, method, num_spec_tokens, reference)  # off ran first: reference is set
                    llm.reset_prefix_cache()  # every run prefills its prompts: no method rides on another's cache
                    seqs, wall = run_level(llm, level_prompts, params, level)
                    run = runs[method]
                    new = sum(len(s.output_ids) for s in seqs)
                    run["rates"].append(new / wall)
                    run["tokens"] += new
                    run["forwards"] += sum(s.metrics.forward_passes for s in seqs)
                    outs = [s.output_ids for s in seqs]
                    if method == "off" and reference is None:
                        reference = outs
                    if rep == 0 and reference is not None:
                        run["identical"] = sum(first_divergence(r, o) is None for r, o in zip(reference, outs))
                    for p, s in zip(level_prompts, seqs):
                        m = s.metrics
                        write_record(
                            raw,
                            ThroughputRecord(
                                method, level, rep, p.question.prompt_id, p.question.category, len(p.token_ids),
                                len(s.output_ids), m.ttft, m.latency, m.forward_passes, m.drafted_tokens,
                                m.accepted_tokens, m.preemptions, list(s.output_ids), wall,
                            ),
                        )
                    bar.update()
            for method in methods:
                run = runs[method]
                results.append(LevelResult(
                    method, level, run["rates"], run["tokens"] / max(run["forwards"], 1), run["identical"],
                    len(level_prompts),
                ))
        bar.close()
        llm.set_spec(None)
    report = format_report(
        llm, results, methods, levels, max_tokens, num_spec_tokens, repetitions, time.perf_counter() - started, prefix
    )
    publish_report(report, raw_path, stdout)
    return report


def format_report(llm, results, methods, levels, max_tokens, num_spec_tokens, repetitions, elapsed, prefix) -> str:
    by = {(r.method, r.concurrency): r for r in results}
    lines = header_table(
        "specserve bench throughput",
        machine_info(llm),
        llm.info(),
        [
            ("workload", f"Spec-Bench first turns, chat template, greedy, max {max_tokens} new tokens"),
            ("requests per level", ", ".join(f"{r.requests} at c={r.concurrency}" for r in results if r.method == methods[0])
             + "; categories interleaved, kept `concurrency` in flight"),
            ("draft length", f"fixed {num_spec_tokens} for drafter rows without @LENGTH; load-aware rows choose per step"),
            ("repetitions", f"{repetitions} (median shown; min in the raw JSONL)"),
            ("peak resident memory", f"{peak_rss_mib():.0f} MiB (KV pool {llm.engine.cache.memory_bytes() / 2**20:.0f} MiB, allocated lazily)"),
            ("run time", f"{elapsed / 60:.1f} min"),
        ],
    )
    lines += ["", "### Throughput (generated tokens/s, all requests of a level)", ""]
    lines.append("| method | " + " | ".join(f"c={c}" for c in levels) + " |")
    lines.append("|---|" + "---|" * len(levels))
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{by[m, c].median:.1f}" for c in levels) + " |")
    lines += ["", "### Ratio to speculation off at the same concurrency", ""]
    lines.append("| method | " + " | ".join(f"c={c}" for c in levels) + " |")
    lines.append("|---|" + "---|" * len(levels))
    for m in methods:
        if m != "off":
            lines.append(f"| {m} | " + " | ".join(f"{by[m, c].median / by['off', c].median:.2f}x" for c in levels) + " |")
    if any(m.startswith(ORACLE) for m in methods):
        lines += ["", f"`{ORACLE}` rows are upper bounds, not methods: the drafter at its fixed length, its proposals "
                  "cut to the drafts verification accepts (known from `off`'s outputs). The drafter runs and is paid "
                  "in full; no verified row is wasted. A draft-length policy can only verify fewer of these drafts: it "
                  "can beat the bound by no more than the drafting time a smaller length saves."]
    lines += ["", "### Acceptance length (tokens per target forward) and outputs identical to `off`", ""]
    lines.append("| method | " + " | ".join(f"c={c}" for c in levels) + " |")
    lines.append("|---|" + "---|" * len(levels))
    for m in methods:
        lines.append(
            f"| {m} | "
            + " | ".join(f"{by[m, c].acceptance_length:.2f} ({by[m, c].identical}/{by[m, c].requests})" for c in levels)
            + " |"
        )
    off = [by["off", c].median for c in levels]
    lines += ["", "### Goals", ""]
    if 1 in levels and 16 in levels:
        ratio = by["off", 16].median / by["off", 1].median
        lines.append(f"- speculation off, throughput at 16 / at 1: {ratio:.2f}x (goal >= 3x): {'met' if ratio >= 3 else 'missed'}")
    for m in methods:
        if not m.endswith(LOAD_AWARE):
            continue
        ratios = [by[m, c].median / o for c, o in zip(levels, off)]
        worst = min(ratios)
        low = [r for c, r in zip(levels, ratios) if c <= 4]
        lines.append(
            f"- {m}: lowest ratio to off {worst:.2f}x (goal >= 0.95x): {'met' if worst >= 0.95 else 'missed'}; "
            + (f"lowest at concurrency 1-4 {min(low):.2f}x (goal >= 1.3x): {'met' if min(low) >= 1.3 else 'missed'}" if low else "")
        )
    n_system, first, later = prefix
    ratio = first / statistics.median(later)
    lines.append(
        f"- prefix caching: {len(later) + 1} requests sharing a {n_system}-token system prompt, one after another: "
        f"TTFT {first * 1000:.0f} ms for the first, median {statistics.median(later) * 1000:.0f} ms for the later ones, "
        f"{ratio:.1f}x lower (goal >= 3x): {'met' if ratio >= 3 else 'missed'}"
    )
    lines.append("")
    return "\n".join(lines)
