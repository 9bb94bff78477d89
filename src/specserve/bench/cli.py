"""`specserve bench run | report | all`: the harness's command line (wired in by `specserve.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from specserve import cli as base
from specserve.bench.methods import ALL_METHODS

DEFAULT_METHODS = ",".join(m for m in ALL_METHODS if m != "plain")


def _harness_options(p: argparse.ArgumentParser, n_per_category: int, repetitions: int, multi_turn: bool) -> None:
    base._model_options(p, "dtype of specserve and the transformers peer", device=False)
    add = p.add_argument
    add("--methods", default=DEFAULT_METHODS, metavar="LIST",
        help=f"comma-separated, from {', '.join(ALL_METHODS)}; plain always runs (default: all)")
    draft = p.add_mutually_exclusive_group()
    draft.add_argument("--draft-model", metavar="PATH",
                       help="draft model for draft-model and transformers+assisted (a .gguf or HF dir)")
    draft.add_argument("--draft-layers", type=base._count(1), metavar="N",
                       help="derive the draft model from the target's first N layers, in a temp dir (default: 8)")
    add("--n-per-category", type=base._count(1), default=n_per_category, metavar="N",
        help=f"questions per category (default: {n_per_category})")
    add("--categories", metavar="LIST", help="comma-separated Spec-Bench categories (default: all)")
    add("--max-tokens", type=base._count(1), default=128, metavar="N", help="most new tokens per request (default: 128)")
    add("--repetitions", type=base._count(1), default=repetitions, metavar="R",
        help=f"timed passes over the prompts (default: {repetitions})")
    add("--warmup", type=base._count(0), default=1, metavar="W", help="untimed requests per method first (default: 1)")
    add("--multi-turn", action=argparse.BooleanOptionalAction, default=multi_turn,
        help="also the second MT-Bench turn, after our plain first answer "
             f"(default: {'on' if multi_turn else 'off'})")
    add("--ignore-eos", action="store_true",
        help="every method runs to --max-tokens (default: every method stops at the target's EOS ids)")
    add("--num-spec-tokens", type=base._spec_tokens, metavar="K",
        help="most draft tokens per step for our drafters, in [1, 32] (default: 8 ngram/suffix, 10 eagle/medusa, 4 draft-model/layer-skip)")
    add("--no-adaptive-spec", dest="adaptive_spec", action="store_false", help="fixed draft length K for ours")
    add("--out", default="bench_out", metavar="DIR", help="where raw JSONL and reports go (default: bench_out/)")


def add_harness_commands(kinds: Any) -> None:
    r = kinds.add_parser(
        "run", help="every method, ours and peers, on the same prompts (raw JSONL + report)",
        description="The benchmark harness: our plain decoding, every drafter and the peers (transformers generate, "
        "llama-cpp-python on the same GGUF), greedy, batch size 1, on the same prompt token ids (Spec-Bench "
        "questions through the chat template). Writes OUT/harness_*.jsonl (one line per request) with its "
        ".meta.json, then the report (.md, plots in OUT/img/). Peers that are not installed are skipped and named "
        "in the report.",
    )
    _harness_options(r, n_per_category=1, repetitions=1, multi_turn=False)
    r.set_defaults(func=cmd_bench_run, parser=r)

    rep = kinds.add_parser(
        "report", help="turn harness JSONL into Markdown tables and PNG plots",
        description="Markdown tables (per category x method: speedup, AL, tokens/s; acceptance per draft position; "
        "TTFT; equivalence with our plain decoding) and PNG plots from raw files written by `specserve bench run` "
        "(and `specserve bench throughput` for throughput vs concurrency).",
    )
    add = rep.add_argument
    add("files", nargs="+", metavar="HARNESS_JSONL", help="raw harness files (their .meta.json is read when present)")
    add("--throughput", action="append", default=[], metavar="JSONL", help="a `bench throughput` raw file (repeatable)")
    add("--out", metavar="FILE", help="the Markdown report (default: the first file with .md)")
    add("--img-dir", metavar="DIR", help="where the plots go (default: img/ next to --out)")
    rep.set_defaults(func=cmd_bench_report, parser=rep)

    a = kinds.add_parser(
        "all", help="regenerate docs/benchmarks.md and its plots from scratch",
        description="Run the harness (every method and peer) and the offline throughput benchmark into --out, then "
        "write DOCS/benchmarks.md and DOCS/img/*.png from the raw files.",
    )
    _harness_options(a, n_per_category=1, repetitions=3, multi_turn=True)
    add = a.add_argument
    add("--docs", default="docs", metavar="DIR", help="where benchmarks.md and img/ go (default: docs/)")
    add("--concurrency", default="1,2,4,8,16", metavar="LIST", help="throughput levels (default: 1,2,4,8,16)")
    add("--throughput-requests", type=base._count(1), metavar="N",
        help="requests per throughput level (default: max(26, 2 x level): two per Spec-Bench category)")
    add("--no-throughput", action="store_true", help="skip the throughput benchmark")
    a.set_defaults(func=cmd_bench_all, parser=a)


def _check_paths(parser: base.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("model", "draft_model"):
        value = getattr(args, flag, None)
        if value is not None and not os.path.exists(value):
            parser.error(f"--{flag.replace('_', '-')}: path does not exist: {value}")
    if args.categories is not None and not base._split(args.categories):
        parser.error("--categories: give at least one category")


def _config(parser: base.ArgumentParser, args: argparse.Namespace):
    from specserve.bench.harness import harness_config

    try:
        return harness_config(
            args.methods, base._split(args.categories), n_per_category=args.n_per_category, max_tokens=args.max_tokens,
            repetitions=args.repetitions, warmup=args.warmup, multi_turn=args.multi_turn, ignore_eos=args.ignore_eos,
            num_spec_tokens=args.num_spec_tokens, adaptive=args.adaptive_spec,
        )
    except ValueError as exc:
        parser.error(base._one_line(exc))


def cmd_bench_run(parser: base.ArgumentParser, args: argparse.Namespace) -> int:
    _check_paths(parser, args)
    config = _config(parser, args)
    from specserve.bench.harness import run_harness
    from specserve.bench.report import write_report

    try:
        raw = run_harness(config, model=args.model, dtype=args.dtype, draft_model=args.draft_model,
                          draft_layers=args.draft_layers, out_dir=args.out)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(base._one_line(exc))
    report = raw.with_suffix(".md")
    sys.stdout.write(write_report([raw], report, img_dir=Path(args.out) / "img" / raw.stem))
    print(f"raw records: {raw}\nreport: {report}")
    return 0


def cmd_bench_report(parser: base.ArgumentParser, args: argparse.Namespace) -> int:
    from specserve.bench.report import write_report

    for path in [*args.files, *args.throughput]:
        if not os.path.isfile(path):
            parser.error(f"{'--throughput' if path in args.throughput else 'HARNESS_JSONL'}: not a file: {path}")
    out = Path(args.out) if args.out else Path(args.files[0]).with_suffix(".md")
    try:
        text = write_report(args.files, out, args.throughput, img_dir=args.img_dir)
    except ValueError as exc:
        parser.error(base._one_line(exc))
    sys.stdout.write(text)
    print(f"report: {out}")
    return 0


def cmd_bench_all(parser: base.ArgumentParser, args: argparse.Namespace) -> int:
    _check_paths(parser, args)
    config = _config(parser, args)
    from specserve.bench.regenerate import ThroughputConfig, run_all
    from specserve.bench.throughput import parse_levels

    if args.draft_model is not None:
        parser.error("--draft-model: `bench all` derives its draft model (use --draft-layers N)")
    throughput = None
    if not args.no_throughput:
        try:
            levels = tuple(parse_levels(args.concurrency))
        except ValueError as exc:
            parser.error(base._one_line(exc))
        throughput = ThroughputConfig(levels=levels, requests=args.throughput_requests, max_tokens=args.max_tokens)
    try:
        target = run_all(config, throughput, args.out, args.docs, model=args.model, dtype=args.dtype,
                         draft_layers=args.draft_layers)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(base._one_line(exc))
    print(f"wrote {target} and its plots in {Path(args.docs) / 'img'}")
    return 0
