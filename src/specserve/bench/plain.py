"""`specserve bench plain`: plain (non-speculative) greedy decoding, specserve vs. transformers.

Both engines get the same prompt token ids (Spec-Bench questions through the chat template),
the same dtype and the same number of new tokens (EOS ignored), so tokens/s compare like for
like. The machines are noisy: the engines run interleaved in one process, with warm-up and
several repetitions, and the headline is the ratio of the medians.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from specserve.api import LLM
from specserve.bench.common import (
    Prompt,
    build_prompts,
    categories_of,
    check_fits,
    first_divergence,
    header_table,
    machine_info,
    publish_report,
    raw_jsonl_path,
    select_questions,
    tokens_per_s,
    write_record,
)
from specserve.bench.common import plural as _plural
from specserve.sampling.params import SamplingParams

__all__ = ["Prompt", "Record", "first_divergence", "machine_info", "run_plain_bench", "tokens_per_s"]

OURS = "specserve"
PEER = "transformers"


@dataclass
class Record:
    """One timed request (one line of the raw JSONL)."""

    method: str
    prompt_id: int
    category: str
    repetition: int
    prompt_tokens: int
    new_tokens: int
    wall_s: float
    ttft_s: float | None
    token_ids: list[int]


# ---------------------------------------------------------------- engines

GenerateFn = Callable[[list[int], int], tuple[list[int], float, float | None]]  # -> (new ids, wall s, TTFT s)


def specserve_runner(llm: LLM) -> GenerateFn:
    def run(ids: list[int], max_tokens: int) -> tuple[list[int], float, float | None]:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # greedy
        llm.reset_prefix_cache()  # repetitions prefill like the first run (transformers caches nothing)
        started = time.perf_counter()
        out = llm.generate([ids], params)[0]
        return out.token_ids, time.perf_counter() - started, out.metrics.ttft

    return run


def load_transformers_model(model_path: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, list[str]]:
    """transformers' own model for `model_path`, dense in `dtype` (a GGUF file is dequantized by transformers)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    notes: list[str] = []
    kwargs: dict[str, Any] = {"dtype": dtype}
    if os.path.isfile(model_path) and model_path.endswith(".gguf"):
        source = os.path.dirname(os.path.abspath(model_path))
        kwargs["gguf_file"] = os.path.basename(model_path)
        gguf_config = getattr(transformers, "GgufConfig", None)
        if gguf_config is not None:  # dense weights in `dtype`, even where GGUF matmul kernels exist
            kwargs["quantization_config"] = gguf_config(dequantize=True)
    else:
        source = model_path
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except ValueError as exc:
        if "gguf_file" not in kwargs or "accelerate" not in str(exc):
            raise
        # transformers refuses GGUF files unless `accelerate` is installed, although a dense load
        # onto one device never calls it: lift that gate for this one call.
        from unittest import mock

        with mock.patch.object(transformers.modeling_utils, "is_accelerate_available", return_value=True):
            model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
        notes.append("`accelerate` is not installed: transformers' GGUF import gate was bypassed for the load")
    model = model.to(device).eval()
    odd = sorted({str(p.dtype) for p in model.parameters() if p.dtype != dtype})
    if odd:
        notes.append(f"transformers model has parameters in {', '.join(odd)} besides {dtype}")
    return model, notes


def transformers_runner(model: Any, device: torch.device) -> GenerateFn:
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos

    def run(ids: list[int], max_tokens: int) -> tuple[list[int], float, float | None]:
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        mask = torch.ones_like(input_ids)
        with torch.inference_mode():
            started = time.perf_counter()
            out = model.generate(
                input_ids,
                attention_mask=mask,
                do_sample=False,
                min_new_tokens=max_tokens,
                max_new_tokens=max_tokens,
                pad_token_id=pad,
            )
            new = out[0, len(ids) :].tolist()  # host copy inside the timed region (syncs CUDA)
            wall = time.perf_counter() - started
        return new, wall, None

    return run


# ---------------------------------------------------------------- summary


@dataclass
class MethodSummary:
    method: str
    per_repetition: list[float]  # aggregate tokens/s of each repetition
    ttft_median_s: float | None
    deterministic: bool  # same tokens for a prompt in every repetition

    @property
    def median(self) -> float:
        return statistics.median(self.per_repetition)

    @property
    def min(self) -> float:
        return min(self.per_repetition)


def summarize(records: list[Record], method: str, repetitions: int) -> MethodSummary:
    mine = [r for r in records if r.method == method]
    per_rep = [tokens_per_s([r for r in mine if r.repetition == k]) for k in range(repetitions)]
    ttfts = [r.ttft_s for r in mine if r.ttft_s is not None]
    by_prompt: dict[int, list[list[int]]] = {}
    for r in mine:
        by_prompt.setdefault(r.prompt_id, []).append(r.token_ids)
    deterministic = all(all(ids == runs[0] for ids in runs) for runs in by_prompt.values())
    return MethodSummary(method, per_rep, statistics.median(ttfts) if ttfts else None, deterministic)


@dataclass
class BenchResult:
    machine: dict[str, str]
    model: dict[str, Any]
    prompts: list[Prompt]
    max_tokens: int
    repetitions: int
    warmup: int
    records: list[Record]
    summaries: dict[str, MethodSummary]
    notes: list[str] = field(default_factory=list)
    raw_path: Path | None = None

    def agreement(self) -> list[tuple[Prompt, int | None]]:
        """(prompt, first differing position or None) for repetition 0, ours vs. the peer."""
        first = {(r.method, r.prompt_id): r.token_ids for r in self.records if r.repetition == 0}
        return [
            (p, first_divergence(first[(OURS, p.question.question_id)], first[(PEER, p.question.question_id)]))
            for p in self.prompts
            if (PEER, p.question.question_id) in first
        ]


def format_report(res: BenchResult) -> str:
    peer = res.summaries.get(PEER)
    n_cat = len(categories_of(res.prompts))
    workload = (
        f"Spec-Bench first turns, {_plural(len(res.prompts), 'prompt')} ({_plural(n_cat, 'category')}), "
        f"chat template, greedy, {res.max_tokens} new tokens each (EOS ignored)"
    )
    runs = f"{res.warmup} warm-up per engine, {_plural(res.repetitions, 'repetition')}, engines interleaved"
    lines = header_table("specserve bench plain", res.machine, res.model, [("workload", workload), ("runs", runs)])
    lines += [
        "",
        "tokens/s = new tokens / wall time of the generate call (prefill included), summed over the prompts "
        "of one repetition.",
        "",
        "| engine | tokens/s median | tokens/s min | per repetition | TTFT median | ours / transformers |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for s in res.summaries.values():
        ratio = "—" if peer is None else f"{s.median / peer.median:.2f}x"
        ttft = "—" if s.ttft_median_s is None else f"{s.ttft_median_s * 1e3:.0f} ms"
        reps = ", ".join(f"{x:.1f}" for x in s.per_repetition)
        lines.append(f"| {s.method} | {s.median:.1f} | {s.min:.1f} | {reps} | {ttft} | {ratio} |")
    lines.append("")
    if peer is not None:
        agree = res.agreement()
        same = sum(d is None for _, d in agree)
        lines.append(f"Greedy tokens identical to transformers: {same}/{len(agree)} prompts.")
        diverged = [f"{p.question.prompt_id} at token {d}" for p, d in agree if d is not None]
        if diverged:
            lines.append(f"First divergence: {', '.join(diverged)}.")
        lines += [
            "",
            "| category | prompt tokens | specserve tok/s | transformers tok/s | ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for cat in categories_of(res.prompts):
            ids = {p.question.question_id for p in res.prompts if p.question.category == cat}
            ptoks = sum(len(p.token_ids) for p in res.prompts if p.question.question_id in ids) / len(ids)
            mine = [r for r in res.records if r.prompt_id in ids]
            rates = [tokens_per_s([r for r in mine if r.method == method]) for method in (OURS, PEER)]
            lines.append(f"| {cat} | {ptoks:.0f} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[0] / rates[1]:.2f}x |")
        lines.append("")
    lines.append(
        "Same tokens in every repetition: "
        + ", ".join(f"{s.method} {'yes' if s.deterministic else 'NO'}" for s in res.summaries.values())
        + "."
    )
    lines += [f"Note: {n}." for n in res.notes]
    if res.raw_path is not None:
        lines.append(f"Raw per-request records: {res.raw_path}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the run


def run_plain_bench(
    model: str | None = None,
    dtype: str | None = None,
    n_per_category: int = 1,
    max_tokens: int = 128,
    repetitions: int = 3,
    warmup: int = 1,
    peer: bool = True,
    out_dir: str | os.PathLike[str] = "bench_out",
    questions_path: str | os.PathLike[str] | None = None,
    stdout: IO[str] | None = None,
    categories: Iterable[str] | None = None,
) -> BenchResult:
    """Run the benchmark, print the Markdown report to `stdout` and return the result."""
    if max_tokens < 1 or repetitions < 1 or warmup < 0:
        raise ValueError("need max_tokens >= 1, repetitions >= 1 and warmup >= 0")
    questions = select_questions(questions_path, n_per_category, categories)
    notes: list[str] = []

    llm = LLM(model, dtype=dtype)
    prompts = build_prompts(llm, questions)
    check_fits(prompts, max_tokens, llm.max_model_len)

    runners: dict[str, GenerateFn] = {OURS: specserve_runner(llm)}
    if not peer:
        notes.append("transformers not run (--no-peer)")
    elif importlib.util.find_spec("transformers") is None:
        notes.append("transformers is not installed: only specserve was run (pip install 'specserve[bench]')")
    else:
        hf_model, hf_notes = load_transformers_model(llm.model_path, llm.dtype, llm.device)
        notes += hf_notes
        runners[PEER] = transformers_runner(hf_model, llm.device)

    raw_path = raw_jsonl_path(out_dir, "plain")
    records: list[Record] = []
    total = len(runners) * (warmup + repetitions * len(prompts))
    with open(raw_path, "w", encoding="utf-8") as raw, tqdm(total=total, desc="bench plain", file=sys.stderr) as bar:
        for name, run in runners.items():
            bar.set_postfix_str(f"{name} warm-up")
            for _ in range(warmup):
                run(prompts[0].token_ids, max_tokens)
                bar.update()
        order = list(runners)
        for rep in range(repetitions):
            for name in order if rep % 2 == 0 else order[::-1]:  # alternate who goes first against drift
                bar.set_postfix_str(f"{name} rep {rep + 1}/{repetitions}")
                for p in prompts:
                    new, wall, ttft = runners[name](p.token_ids, max_tokens)
                    q = p.question
                    rec = Record(name, q.question_id, q.category, rep, len(p.token_ids), len(new), wall, ttft, new)
                    records.append(rec)
                    write_record(raw, rec)
                    bar.update()

    wrong = [r for r in records if r.new_tokens != max_tokens]
    if wrong:
        notes.append(f"{len(wrong)} requests did not produce exactly {max_tokens} tokens")
    result = BenchResult(
        machine=machine_info(llm),
        model=llm.info(),
        prompts=prompts,
        max_tokens=max_tokens,
        repetitions=repetitions,
        warmup=warmup,
        records=records,
        summaries={name: summarize(records, name, repetitions) for name in runners},
        notes=notes,
        raw_path=raw_path,
    )
    publish_report(format_report(result), raw_path, stdout)
    return result
