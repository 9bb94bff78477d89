"""Command line: `specserve generate | info | serve | make-draft | bench plain|spec|throughput|serve|run|report|all`.

Bad input ends with one `error:` line naming the flag and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import NoReturn

from specserve.sampling.params import SamplingParams

DTYPE_CHOICES = ("bfloat16", "float32")
DEVICE_CHOICES = ("cpu", "cuda")

#: SamplingParams fields the CLI exposes, longest first (so `top_p` wins over `top`...).
_FIELDS = sorted((f.name for f in dataclasses.fields(SamplingParams)), key=len, reverse=True)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, no usage block: `specserve generate: error: --top-p must be in (0, 1], got 2`."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(text: str) -> int | float:
    """A float flag that keeps integers as typed, so errors echo `-1`, not `-1.0`."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _int_in(low: int, high: int):
    """An int flag in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value

    return parse


_spec_tokens = _int_in(1, 32)


def _flag_error(exc: ValueError) -> str:
    """`temperature must be >= 0, got -1` -> `--temperature must be >= 0, got -1`."""
    message = str(exc)
    for name in _FIELDS:
        if message.startswith(name + " "):
            return "--" + name.replace("_", "-") + message[len(name) :]
    return message


def _model_options(p: argparse.ArgumentParser, dtype_help: str, device: bool = True) -> None:
    p.add_argument(
        "--model", metavar="PATH", help="a .gguf file or a Hugging Face model dir (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help=f"{dtype_help} (default: bfloat16 where the hardware or the native layers have it, else float32)")
    if device:
        p.add_argument("--device", choices=DEVICE_CHOICES, help="default: cuda when present")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="specserve", description="Fast, lossless LLM decoding.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = commands.add_parser("generate", help="complete one prompt", description="Complete one prompt, print the text.")
    _model_options(g, "weights and compute dtype")
    add = g.add_argument
    add("--max-tokens", type=int, default=128, metavar="N", help="most new tokens (default: 128)")
    add("--temperature", type=_number, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    add("--top-p", type=_number, default=1.0, metavar="P", help="nucleus sampling, in (0, 1] (default: 1)")
    add("--top-k", type=int, default=0, metavar="K", help="0 or -1 = off (default: 0)")
    add("--min-p", type=_number, default=0.0, metavar="P", help="in [0, 1] (default: 0)")
    add("--repetition-penalty", type=_number, default=1.0, metavar="R", help="> 0, 1 = off (default: 1)")
    add("--presence-penalty", type=_number, default=0.0, metavar="P", help="in [-2, 2] (default: 0)")
    add("--frequency-penalty", type=_number, default=0.0, metavar="F", help="in [-2, 2] (default: 0)")
    add("--seed", type=int, metavar="S", help="makes sampling reproducible")
    add("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    add("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    add("--system", metavar="TEXT", help="system message (implies --chat)")
    add("--stream", action=argparse.BooleanOptionalAction, default=True, help="print text as it comes (default: on)")
    add("--stats", action="store_true", help="print token counts, TTFT, tokens/s and speculation stats to stderr")
    add(
        "--spec",
        metavar="METHOD",
        help="speculative decoding: ngram, suffix, draft-model:PATH, layer-skip[:L1,L2,...], eagle[:DIR], "
        "medusa[:DIR], or ngram+MODEL / suffix+MODEL (copy where the context repeats, MODEL otherwise; "
        "e.g. ngram+eagle) (default: off)",
    )
    add(
        "--num-spec-tokens",
        type=_spec_tokens,
        metavar="N",
        help="most draft tokens per step, in [1, 32] (default: 8 for ngram/suffix, 4 for model drafters)",
    )
    add(
        "--no-adaptive-spec",
        dest="adaptive_spec",
        action="store_false",
        help="always draft --num-spec-tokens tokens (default: adapt the draft length per request)",
    )
    add("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    g.set_defaults(func=cmd_generate, parser=g)

    i = commands.add_parser("info", help="describe a model", description="Print what a model is, 'key: value' a line.")
    _model_options(i, "weights and compute dtype")
    i.set_defaults(func=cmd_info, parser=i)

    d = commands.add_parser(
        "make-draft",
        help="derive a draft model from the target's first layers",
        description="Save the target's first N layers + final norm + LM head as a Hugging Face directory, "
        "usable with --spec draft-model:DIR.",
    )
    d.add_argument("--model", metavar="PATH", help="the target (.gguf or HF directory; default: SmolLM2-135M-Instruct)")
    d.add_argument("--layers", type=_count(1), required=True, metavar="N", help="layers to keep")
    d.add_argument("--out", required=True, metavar="DIR", help="output directory")
    d.set_defaults(func=cmd_make_draft, parser=d)

    t = commands.add_parser(
        "train-drafter",
        help="train an EAGLE head or Medusa heads for a target by self-distillation",
        description="Synthesize prompts (no Spec-Bench question), let the target answer them, and train an "
        "EAGLE head or Medusa heads on its features and tokens. Data and a checkpoint per epoch are kept in --out, "
        "so a stopped run resumes; a data.pt copied into a new --out is reused (e.g. to train the other kind on the "
        "same data). Use the result with "
        "--spec eagle:DIR or --spec medusa:DIR.",
    )
    add = t.add_argument
    add("--target", metavar="PATH", help="the target (.gguf or HF directory; default: SmolLM2-135M-Instruct)")
    add("--kind", choices=("eagle", "medusa"), default="eagle", help="the head to train (default: eagle)")
    add("--out", required=True, metavar="DIR", help="output directory (data, checkpoint, head)")
    add("--dtype", choices=DTYPE_CHOICES, help="dtype of the target while it writes the data (default: bfloat16 where the hardware or the native layers have it, else float32)")
    add("--prompts", type=_count(8), default=640, metavar="N", help="synthesized prompts (default: 640, plus 30%% passage tasks)")
    add("--self-instruct", type=_count(0), default=0, metavar="N",
        help="more prompts written by the target itself from few-shot examples (default: 0); "
        "a reused data.pt with fewer is extended")
    add("--max-tokens", type=_count(16), default=256, metavar="N", help="most tokens per answer (default: 256)")
    add("--epochs", type=_count(1), default=6, metavar="E", help="passes over the data (default: 6)")
    add("--batch-size", type=_count(1), default=8, metavar="B", help="sequences per step; Medusa: 64 x B feature rows (default: 8)")
    add("--lr", type=_number, default=1e-3, metavar="LR", help="peak learning rate, > 0 (default: 1e-3)")
    add("--draft-vocab", type=_count(16), default=8192, metavar="V", help="draft vocabulary size (default: 8192)")
    add("--seed", type=_count(0), default=0, metavar="S", help="prompt synthesis and training seed, >= 0 (default: 0)")
    add("--unroll", type=_count(1), metavar="S",
        help="with --kind eagle: drafting depths trained, each on the head's own earlier guesses (default: 3)")
    add("--feature-layers", metavar="LIST",
        help="with --kind eagle: comma-separated target layers (0-based) whose outputs the head reads beside the "
        "final hidden state (EAGLE-3's multi-layer features), e.g. 2,15; a reused data.pt's features are "
        "recomputed for them (default: none)")
    add("--init", metavar="DIR",
        help="with --kind eagle: start from this trained head (its weights and draft vocabulary; 'packaged' for the "
        "head shipped with specserve) instead of from scratch")
    add("--medusa-heads", type=_count(1), metavar="K", help="with --kind medusa: number of heads (default: 4)")
    add("--medusa-layers", type=_count(1), metavar="L", help="with --kind medusa: residual blocks per head (default: 1)")
    t.set_defaults(func=cmd_train_drafter, parser=t)

    b = commands.add_parser("bench", help="benchmarks", description="Benchmarks on the Spec-Bench questions.")
    kinds = b.add_subparsers(dest="bench", metavar="BENCH", required=True)
    bp = kinds.add_parser(
        "plain",
        help="plain greedy decoding, specserve vs. transformers",
        description="Plain greedy decoding of the first N Spec-Bench questions of every category (first turn, chat "
        "template), the same number of new tokens for each engine (EOS ignored); prints a Markdown table and "
        "writes raw per-request JSONL. Questions: $SPECSERVE_BENCH_QUESTIONS, else "
        "shared/bench/spec_bench_questions.jsonl found above the current directory.",
    )
    _model_options(bp, "dtype of both engines", device=False)
    add = bp.add_argument
    add("--n-per-category", type=_count(1), default=1, metavar="N", help="questions per category (default: 1)")
    add("--max-tokens", type=_count(1), default=128, metavar="N", help="new tokens per request (default: 128)")
    add("--repetitions", type=_count(1), default=3, metavar="R", help="timed passes over the prompts (default: 3)")
    add("--warmup", type=_count(0), default=1, metavar="W", help="untimed requests per engine first (default: 1)")
    add("--no-peer", action="store_true", help="run specserve only, not transformers")
    add("--out", default="bench_out", metavar="DIR", help="where raw JSONL and the report go (default: bench_out/)")
    add("--categories", metavar="LIST", help="comma-separated Spec-Bench categories (default: all)")
    bp.set_defaults(func=cmd_bench_plain, parser=bp)

    bs = kinds.add_parser(
        "spec",
        help="speculative decoding methods vs. plain decoding",
        description="Speculative decoding methods against specserve's own plain decoding, in one run on one loaded "
        "target: the first N Spec-Bench questions of every category (first turn, chat template, greedy, EOS "
        "respected), batch size 1, for each prompt plain decoding and then each method. Reports acceptance length, "
        "tokens/s and speedup per category, acceptance per draft position, drafting/verification time and whether "
        "outputs equal plain decoding's; writes raw per-request JSONL and the Markdown report to --out. Questions: "
        "$SPECSERVE_BENCH_QUESTIONS, else shared/bench/spec_bench_questions.jsonl found above the current directory.",
    )
    _model_options(bs, "dtype of target and draft model", device=False)
    add = bs.add_argument
    add(
        "--methods",
        default="ngram,suffix,draft-model,layer-skip",
        metavar="LIST",
        help="comma-separated, from ngram, suffix, draft-model, layer-skip (default: all four)",
    )
    draft = bs.add_mutually_exclusive_group()
    draft.add_argument("--draft-model", metavar="PATH", help="draft model for draft-model (a .gguf or HF dir)")
    draft.add_argument(
        "--draft-layers",
        type=_count(1),
        metavar="N",
        help="derive the draft model from the target's first N layers, in a temp dir (default: 8)",
    )
    add("--n-per-category", type=_count(1), default=5, metavar="N", help="questions per category (default: 5)")
    add("--categories", metavar="LIST", help="comma-separated Spec-Bench categories (default: all)")
    add("--max-tokens", type=_count(1), default=256, metavar="N", help="most new tokens per request (default: 256)")
    add("--repetitions", type=_count(1), default=1, metavar="R", help="timed passes over the prompts (default: 1)")
    add("--warmup", type=_count(0), default=1, metavar="W", help="untimed requests per method first (default: 1)")
    add(
        "--num-spec-tokens",
        type=_spec_tokens,
        metavar="K",
        help="most draft tokens per step, in [1, 32] (default: 8 for ngram/suffix, 4 for model drafters)",
    )
    add("--no-adaptive-spec", dest="adaptive_spec", action="store_false", help="fixed draft length K")
    add("--out", default="bench_out", metavar="DIR", help="where raw JSONL and the report go (default: bench_out/)")
    bs.set_defaults(func=cmd_bench_spec, parser=bs)

    bt = kinds.add_parser(
        "throughput",
        help="offline throughput vs. concurrency, speculation off / on / load-aware",
        description="Offline throughput under continuous batching: Spec-Bench first turns (chat template, greedy) "
        "kept C requests in flight at each concurrency level C, for speculation off, each drafter with a fixed "
        "draft length, each drafter with load-aware draft lengths (METHOD+load-aware) and oracle upper bounds "
        "(oracle:DRAFTER[@B]), measured side by side "
        "in one run. Prints tokens/s per level, ratios to speculation off, acceptance length, outputs identical "
        "to off, peak resident memory; writes raw per-request JSONL and the Markdown report to --out.",
    )
    _model_options(bt, "dtype of the model")
    add = bt.add_argument
    add(
        "--methods",
        default="off,ngram,suffix,ngram+load-aware,suffix+load-aware",
        metavar="LIST",
        help="comma-separated: off, a drafter, DRAFTER@B (B drafts), DRAFTER+load-aware, or oracle:DRAFTER[@B] "
        "(an upper bound: proposals cut to the drafts verification accepts) (default: off,ngram,suffix,"
        "ngram+load-aware,suffix+load-aware)",
    )
    add("--concurrency", default="1,2,4,8,16,32", metavar="LIST", help="levels (default: 1,2,4,8,16,32)")
    add("--requests", type=_count(1), metavar="N", help="requests per level (default: max(26, 2 x level): two per Spec-Bench category)")
    add("--max-tokens", type=_count(1), default=128, metavar="N", help="most new tokens per request (default: 128)")
    add("--num-spec-tokens", type=_spec_tokens, default=8, metavar="K", help="draft length, in [1, 32] (default: 8)")
    add("--repetitions", type=_count(1), default=1, metavar="R", help="timed runs per level and method (default: 1)")
    add("--out", default="bench_out", metavar="DIR", help="where raw JSONL and the report go (default: bench_out/)")
    bt.set_defaults(func=cmd_bench_throughput, parser=bt)

    bf = kinds.add_parser(
        "forward",
        help="target forward time by batch shape, native layers vs. PyTorch",
        description="One target forward of S sequences x N new tokens each over C cached tokens per sequence (the "
        "shape of a verification step, every row's logits computed), for the native decoder layers and the PyTorch "
        "path side by side in one run on one loaded model. Prints milliseconds per forward (best of R) and the ratio; "
        "writes raw JSONL and the Markdown report to --out.",
    )
    _model_options(bf, "dtype of the model")
    add = bf.add_argument
    add("--paths", default="native,pytorch", metavar="LIST", help="comma-separated: native, pytorch (default: both)")
    add("--contexts", default="128,512", metavar="LIST", help="cached tokens per sequence (default: 128,512)")
    add("--seqs", default="1,4,16", metavar="LIST", help="sequences per forward (default: 1,4,16)")
    add("--tokens", default="1,5,9,17", metavar="LIST", help="new tokens per sequence (default: 1,5,9,17)")
    add("--repetitions", type=_count(1), default=3, metavar="R", help="timed forwards per cell (default: 3)")
    add("--out", default="bench_out", metavar="DIR", help="where raw JSONL and the report go (default: bench_out/)")
    bf.set_defaults(func=cmd_bench_forward, parser=bf)
    _add_serve_commands(commands, kinds)
    from specserve.bench.cli import add_harness_commands

    add_harness_commands(kinds)
    return parser


# ---------------------------------------------------------------- commands


def _check_spec(parser: ArgumentParser, spec: str | None) -> None:
    """What can be told of `--spec` without the model: the method's name, a draft model path that exists."""
    if spec is None:
        return
    from specserve.spec import RETRIEVAL, SPEC_METHODS, hybrid_error, split_hybrid

    choices = ", ".join(SPEC_METHODS)
    why = hybrid_error(spec)
    if why is not None:
        parser.error(f"--spec: {why}")
    spec = split_hybrid(spec)[1]  # a hybrid's model drafter is checked like the method alone
    name, colon, arg = spec.partition(":")
    if name in RETRIEVAL:
        if colon:
            parser.error(f"--spec: {name} takes no argument, got {spec!r}")
    elif name == "draft-model":
        if not arg:
            parser.error("--spec: draft-model needs the draft model's path: draft-model:PATH")
        if not os.path.exists(arg):
            parser.error(f"--spec: draft model path does not exist: {arg}")
    elif name == "layer-skip":
        if colon and not all(x.strip().isdigit() for x in arg.split(",")):
            parser.error(f"--spec: layer-skip takes a comma-separated list of layer indices, got {arg!r}")
    elif name in ("eagle", "medusa"):
        if colon and not os.path.isdir(arg):
            parser.error(f"--spec: {name} head directory does not exist: {arg}")
    else:
        parser.error(f"--spec: unknown method {spec!r}; choose one of {choices}")


def _load_llm(parser: ArgumentParser, args: argparse.Namespace):
    """The model, with every bad flag reported before the (slow) load where possible."""
    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model: path does not exist: {args.model}")
    spec = getattr(args, "spec", None)
    _check_spec(parser, spec)
    from specserve.api import LLM, resolve_device

    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    try:
        llm = LLM(args.model, dtype=args.dtype, device=args.device)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        parser.error(f"--model: cannot load {args.model or 'the default model'}: {exc}")
    if spec is not None:
        # the same as LLM(..., spec=...), but a failure here is the drafter's, not the model's
        started = time.perf_counter()
        try:
            llm.set_spec(spec, args.num_spec_tokens, args.adaptive_spec)
        except (ValueError, OSError) as exc:
            parser.error(f"--spec: cannot use {spec}: {_one_line(exc)}")
        llm.load_time += time.perf_counter() - started
    return llm


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def cmd_generate(parser: ArgumentParser, args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty,
            seed=args.seed,
            stop=args.stop,
        )
    except ValueError as exc:
        parser.error(_flag_error(exc))
    if args.spec is None and (args.num_spec_tokens is not None or not args.adaptive_spec):
        parser.error("--num-spec-tokens and --no-adaptive-spec need --spec")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load_llm(parser, args)
    try:
        if args.chat or args.system is not None:
            messages = [{"role": "system", "content": args.system}] if args.system is not None else []
            ids = llm.chat_prompt(messages + [{"role": "user", "content": prompt}])
        else:
            ids = llm.encode(prompt)
    except ValueError as exc:
        parser.error(f"PROMPT: {exc}")
    if not ids:
        parser.error("PROMPT: the prompt is empty")
    if len(ids) >= llm.max_model_len:
        parser.error(f"PROMPT: {len(ids)} tokens do not fit the context limit (max_model_len {llm.max_model_len})")

    started = time.perf_counter()
    first_text: float | None = None
    seq = None  # the engine's sequence, for --stats
    text = ""
    if args.stream:
        before = set(llm.engine.requests)
        for delta in llm.stream(ids, params):
            if first_text is None:
                first_text = time.perf_counter()
                new = [s for k, s in llm.engine.requests.items() if k not in before]
                seq = new[0] if len(new) == 1 else None
            text += delta
            sys.stdout.write(delta)
            sys.stdout.flush()
        metrics, finish = (seq.metrics, seq.finish_reason) if seq is not None else (None, None)
    else:
        out = llm.generate([ids], params)[0]
        text, metrics, finish = out.text, out.metrics, out.finish_reason
        sys.stdout.write(text)
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        wall = time.perf_counter() - started
        first = None if first_text is None else first_text - started
        _print_stats(len(ids), wall, first, metrics, finish, llm.load_time, _spec_label(llm, args))
    return 0


def _spec_label(llm, args: argparse.Namespace) -> str | None:
    if llm.spec is None:
        return None
    return f"{llm.spec} (num_spec_tokens {llm.num_spec_tokens}, {'adaptive' if args.adaptive_spec else 'fixed'})"


def _print_stats(
    prompt_tokens: int,
    wall: float,
    first_text: float | None,
    metrics,
    finish: str | None,
    load_time: float,
    spec: str | None = None,
) -> None:
    """`key: value` lines on stderr; `metrics` is the request's RequestMetrics (None if it could not be found).

    With `spec` (the speculative method, None = plain decoding), the speculation counters too.
    """
    rows: list[tuple[str, str]] = [("prompt tokens", str(prompt_tokens))]
    if metrics is not None:
        ttft, rate = metrics.ttft, metrics.decode_tokens_per_s
        rows += [
            ("generated tokens", str(metrics.generated_tokens)),
            ("finish reason", str(finish)),
            ("ttft", "n/a" if ttft is None else f"{ttft * 1e3:.1f} ms"),
            ("decode tokens/s", "n/a" if rate is None else f"{rate:.1f}"),
            ("overall tokens/s", f"{metrics.generated_tokens / wall:.1f}" if wall > 0 else "n/a"),
        ]
        if spec is not None:
            al, rate = metrics.acceptance_length, metrics.acceptance_rate
            rows += [
                ("spec", spec),
                ("forward passes", str(metrics.forward_passes)),
                ("acceptance length", "n/a" if al is None else f"{al:.2f}"),
                ("drafted tokens", str(metrics.drafted_tokens)),
                ("accepted tokens", str(metrics.accepted_tokens)),
                ("acceptance rate", "n/a" if rate is None else f"{rate * 100:.1f}%"),
            ]
    elif spec is not None:
        rows.append(("spec", spec))
    elif first_text is not None:
        rows.append(("time to first text", f"{first_text * 1e3:.1f} ms"))
    rows += [("total time", f"{wall:.3f} s"), ("load time", f"{load_time:.2f} s")]
    for key, value in rows:
        print(f"{key}: {value}", file=sys.stderr)


def cmd_info(parser: ArgumentParser, args: argparse.Namespace) -> int:
    llm = _load_llm(parser, args)
    for key, value in llm.info().items():
        print(f"{key}: {value}")
    return 0


def cmd_make_draft(parser: ArgumentParser, args: argparse.Namespace) -> int:
    from specserve.model.export import export_truncated
    from specserve.model.loader import default_model_path

    source = args.model if args.model is not None else default_model_path()
    if not os.path.exists(source):
        parser.error(f"--model: {source} does not exist")
    try:
        out = export_truncated(source, args.out, args.layers)
    except ValueError as exc:
        parser.error(str(exc) if "--layers" in str(exc) else f"--model: {exc}")
    print(out)
    return 0


def cmd_train_drafter(parser: ArgumentParser, args: argparse.Namespace) -> int:
    if args.target is not None and not os.path.exists(args.target):
        parser.error(f"--target: path does not exist: {args.target}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out: not a directory: {args.out}")
    for flag, value in (("--medusa-heads", args.medusa_heads), ("--medusa-layers", args.medusa_layers)):
        if value is not None and args.kind != "medusa":
            parser.error(f"{flag} only applies to --kind medusa")
    for flag, value in (("--unroll", args.unroll), ("--feature-layers", args.feature_layers), ("--init", args.init)):
        if value is not None and args.kind != "eagle":
            parser.error(f"{flag} only applies to --kind eagle")
    feature_layers: tuple[int, ...] = ()
    if args.feature_layers is not None:
        try:
            feature_layers = tuple(int(x) for x in args.feature_layers.split(",") if x.strip())
        except ValueError:
            parser.error(f"--feature-layers: expected comma-separated layer numbers, got {args.feature_layers!r}")
        if not feature_layers or min(feature_layers) < 0 or len(set(feature_layers)) != len(feature_layers):
            parser.error(f"--feature-layers: expected distinct layer numbers >= 0, got {args.feature_layers!r}")
    init = args.init
    if init == "packaged":
        from specserve.spec.eagle import DEFAULT_EAGLE

        init = str(DEFAULT_EAGLE)
    elif init is not None and not os.path.isdir(init):
        parser.error(f"--init: not a head directory: {init}")
    from specserve.api import LLM
    from specserve.spec.train import TrainConfig, train_drafter

    try:
        llm = LLM(args.target, dtype=args.dtype, max_num_seqs=32, max_model_len=2048)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        parser.error(f"--target: cannot load {args.target or 'the default model'}: {exc}")
    num_layers = llm.engine.runner.model.config.num_layers
    if feature_layers and max(feature_layers) >= num_layers:
        parser.error(f"--feature-layers: the target has layers 0..{num_layers - 1}, got {args.feature_layers!r}")
    cfg = TrainConfig(prompts=args.prompts, self_instruct=args.self_instruct, max_tokens=args.max_tokens, epochs=args.epochs,
                      batch_size=args.batch_size, lr=float(args.lr), draft_vocab=args.draft_vocab, seed=args.seed,
                      kind=args.kind, medusa_heads=args.medusa_heads or 4, medusa_layers=args.medusa_layers or 1,
                      unroll=args.unroll or 3, feature_layers=feature_layers, init=init)
    try:
        out = train_drafter(llm, args.out, cfg, log=lambda line: print(line, file=sys.stderr))
    except ValueError as exc:
        msg = str(exc)
        flag = ("--out" if "checkpoint" in msg else "--feature-layers" if "feature layers" in msg
                else "--init" if init is not None and init in msg else "--target")
        parser.error(f"{flag}: {_one_line(exc)}")
    print(out)
    return 0


def cmd_bench_plain(parser: ArgumentParser, args: argparse.Namespace) -> int:
    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model: path does not exist: {args.model}")
    from specserve.bench.plain import run_plain_bench

    try:
        run_plain_bench(
            model=args.model,
            dtype=args.dtype,
            n_per_category=args.n_per_category,
            max_tokens=args.max_tokens,
            repetitions=args.repetitions,
            warmup=args.warmup,
            peer=not args.no_peer,
            out_dir=args.out,
            categories=_split(args.categories),
        )
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    return 0


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def cmd_bench_spec(parser: ArgumentParser, args: argparse.Namespace) -> int:
    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model: path does not exist: {args.model}")
    if args.draft_model is not None and not os.path.exists(args.draft_model):
        parser.error(f"--draft-model: path does not exist: {args.draft_model}")
    if args.categories is not None and not _split(args.categories):
        parser.error("--categories: give at least one category")
    from specserve.bench.spec import parse_methods, run_spec_bench

    try:
        methods = parse_methods(args.methods)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_spec_bench(
            model=args.model,
            dtype=args.dtype,
            methods=methods,
            draft_model=args.draft_model,
            draft_layers=args.draft_layers,
            n_per_category=args.n_per_category,
            max_tokens=args.max_tokens,
            repetitions=args.repetitions,
            warmup=args.warmup,
            num_spec_tokens=args.num_spec_tokens,
            adaptive=args.adaptive_spec,
            out_dir=args.out,
            categories=_split(args.categories),
        )
    except (ValueError, FileNotFoundError) as exc:
        parser.error(_one_line(exc))
    return 0


def cmd_bench_forward(parser: ArgumentParser, args: argparse.Namespace) -> int:
    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model: path does not exist: {args.model}")
    from specserve.bench.forward import parse_ints, parse_paths, run_forward_bench

    try:
        paths = parse_paths(args.paths)
        contexts = parse_ints(args.contexts, "--contexts")
        seqs = parse_ints(args.seqs, "--seqs")
        tokens = parse_ints(args.tokens, "--tokens")
    except ValueError as exc:
        parser.error(str(exc))
    if max(contexts) + max(tokens) > 32768:
        parser.error(f"--contexts/--tokens: {max(contexts)} + {max(tokens)} tokens is past the 32768 this bench allows")
    if max(seqs) > 256:
        parser.error(f"--seqs: at most 256 sequences, got {max(seqs)}")
    try:
        run_forward_bench(
            model=args.model, dtype=args.dtype, device=args.device, paths=paths, contexts=contexts, seqs=seqs,
            tokens=tokens, repetitions=args.repetitions, out_dir=args.out,
        )
    except (ValueError, FileNotFoundError) as exc:
        parser.error(_one_line(exc))
    return 0


def cmd_bench_throughput(parser: ArgumentParser, args: argparse.Namespace) -> int:
    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model: path does not exist: {args.model}")
    from specserve.bench.throughput import parse_levels, parse_methods, run_throughput_bench

    try:
        methods = parse_methods(args.methods)
        levels = parse_levels(args.concurrency)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_throughput_bench(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            methods=methods,
            levels=levels,
            requests_per_level=args.requests,
            max_tokens=args.max_tokens,
            num_spec_tokens=args.num_spec_tokens,
            repetitions=args.repetitions,
            out_dir=args.out,
        )
    except (ValueError, FileNotFoundError) as exc:
        parser.error(_one_line(exc))
    return 0


# ---------------------------------------------------------------- serve, bench serve


_port = _int_in(0, 65535)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_serve_commands(commands, kinds) -> None:
    s = commands.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics (Prometheus). "
        "Binds 127.0.0.1 unless --host says otherwise; answers 503 while the model loads. SIGINT/SIGTERM drain: "
        "requests in flight finish (up to --shutdown-timeout), new ones get 503.",
    )
    _model_options(s, "weights and compute dtype")
    add = s.add_argument
    add("--spec", metavar="METHOD", help="speculative decoding: ngram, suffix, draft-model:PATH, layer-skip[:L,...], "
        "eagle[:DIR], medusa[:DIR], or ngram+MODEL / suffix+MODEL (e.g. ngram+eagle)")
    add("--num-spec-tokens", type=_spec_tokens, metavar="N", help="most draft tokens per step, in [1, 32]")
    add("--no-adaptive-spec", dest="adaptive_spec", action="store_false", help="always draft --num-spec-tokens tokens")
    add("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    add("--port", type=_port, default=8000, help="TCP port (default: 8000)")
    add("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/* (default: $SPECSERVE_API_KEY, else none)")
    add("--served-model-name", metavar="NAME", help="the model id clients send (default: the model file's name)")
    add("--max-num-seqs", type=_count(1), default=8, metavar="N", help="sequences decoded together (default: 8)")
    add("--max-model-len", type=_count(16), metavar="N", help="context limit per sequence (default: the model's, at most 4096)")
    add("--max-num-batched-tokens", type=_count(16), default=512, metavar="N", help="tokens in one forward; long prompts are prefilled in chunks of it (default: 512)")
    add("--kv-cache-tokens", type=_count(16), metavar="N", help="KV memory budget in tokens, at least --max-model-len (default: max_num_seqs x max_model_len, at most 32768)")
    add("--max-queue", type=_count(0), default=256, metavar="N", help="sequences that may wait beyond the batch before 429 (default: 256)")
    add("--max-tokens-limit", type=_count(1), metavar="N", help="largest max_tokens a request may ask for (default: the context limit)")
    add("--max-request-bytes", type=_count(1024), default=1 << 20, metavar="B", help="largest request body (default: 1 MiB)")
    add("--shutdown-timeout", type=_seconds, default=30.0, metavar="S", help="on shutdown, seconds to let requests finish (default: 30)")
    add("--log-level", choices=("debug", "info", "warning", "error"), default="info", help="default: info")
    s.set_defaults(func=cmd_serve, parser=s)

    b = kinds.add_parser(
        "serve",
        help="load test of the HTTP server, speculation off vs. on",
        description="Starts `specserve serve` on loopback once per configuration (plain, then --spec), sends "
        "--concurrency concurrent streaming chat requests (greedy, Spec-Bench first turns) until --requests or "
        "--duration is reached (both split evenly between the configurations), and checks every streamed answer "
        "against the same server's non-streamed answer for the same prompt (token ids and text; a divergence "
        "counts only when it is a numerical near-tie the runner-up token explains). Reports errors, lost or "
        "duplicated tokens, p50/p99 TTFT and inter-token latency, tokens/s and acceptance length; writes raw "
        "per-request JSONL and the Markdown report to --out.",
    )
    _model_options(b, "weights and compute dtype of the server", device=False)
    add = b.add_argument
    add("--spec", default="ngram", metavar="METHOD", help="the speculative configuration (default: ngram)")
    add("--num-spec-tokens", type=_spec_tokens, metavar="N", help="most draft tokens per step, in [1, 32]")
    add("--requests", type=_count(1), default=2000, metavar="N", help="most streamed requests in all (default: 2000)")
    add("--duration", type=_seconds, default=300.0, metavar="S", help="most seconds of streamed traffic in all, references and start-up not counted (default: 300)")
    add("--concurrency", type=_count(1), default=64, metavar="C", help="concurrent streaming clients (default: 64)")
    add("--max-tokens", type=_count(1), default=64, metavar="N", help="max_tokens per request (default: 64)")
    add("--max-num-seqs", type=_count(1), default=16, metavar="N", help="the servers' batch size (default: 16)")
    add("--max-model-len", type=_count(16), default=2048, metavar="N", help="the servers' context limit (default: 2048)")
    add("--n-per-category", type=_count(1), default=1, metavar="N", help="Spec-Bench questions per category (default: 1)")
    add("--categories", metavar="LIST", help="comma-separated Spec-Bench categories (default: all)")
    add("--out", default="bench_out", metavar="DIR", help="where raw JSONL, server logs and the report go (default: bench_out/)")
    b.set_defaults(func=cmd_bench_serve, parser=b)


def cmd_serve(parser: ArgumentParser, args: argparse.Namespace) -> int:
    import socket

    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model: path does not exist: {args.model}")
    _check_spec(parser, args.spec)
    if args.spec is None and (args.num_spec_tokens is not None or not args.adaptive_spec):
        parser.error("--num-spec-tokens and --no-adaptive-spec need --spec")
    if args.max_tokens_limit is not None and args.max_model_len is not None and args.max_tokens_limit >= args.max_model_len:
        parser.error(f"--max-tokens-limit must be < --max-model-len ({args.max_model_len}), got {args.max_tokens_limit}")
    from specserve.api import LLM, resolve_device
    from specserve.server.app import ServerConfig, served_model_name
    from specserve.server.launch import run_server

    try:
        resolve_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except (OSError, UnicodeError) as exc:
        parser.error(f"--port: cannot bind {args.host}:{args.port}: {_one_line(exc)}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < (args.max_model_len or 0):
        parser.error(f"--kv-cache-tokens must be >= --max-model-len ({args.max_model_len}), got {args.kv_cache_tokens}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("SPECSERVE_API_KEY") or None
    if api_key is not None and not api_key.strip():
        parser.error("--api-key: must not be empty")
    try:
        config = ServerConfig(
            model_name=args.served_model_name or served_model_name(args.model),
            api_key=api_key,
            max_queue=args.max_queue,
            max_request_bytes=args.max_request_bytes,
            max_tokens_limit=args.max_tokens_limit,
            shutdown_timeout=args.shutdown_timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))

    def load():
        llm = LLM(
            args.model,
            dtype=args.dtype,
            device=args.device,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_tokens=args.kv_cache_tokens,
            spec=args.spec,
            num_spec_tokens=args.num_spec_tokens,
            adaptive_spec=args.adaptive_spec,
        )
        # the first forwards of each shape are slow (kernel set-up): pay for them here, not on the first
        # requests: a full batch of prompts of different lengths, decoding a few tokens together
        base = (llm.encode("Hello, how are you today?") if llm.tokenizer is not None else []) or [1]
        lengths = [min(len(base) * (1 << i), llm.max_model_len // 4) for i in range(llm.max_num_seqs)]
        llm.generate([(base * (n // len(base) + 1))[:n] for n in lengths], SamplingParams(max_tokens=4, ignore_eos=True))
        spec = "off" if llm.spec is None else f"{llm.spec} (num_spec_tokens {llm.num_spec_tokens})"
        print(
            f"specserve: serving {config.model_name} on http://{args.host}:{args.port} "
            f"(dtype {llm.info()['dtype']}, max_num_seqs {llm.max_num_seqs}, max_model_len {llm.max_model_len}, spec {spec})",
            file=sys.stderr,
            flush=True,
        )
        return llm

    return run_server(load, config, args.host, args.port, args.log_level)


def cmd_bench_serve(parser: ArgumentParser, args: argparse.Namespace) -> int:
    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model: path does not exist: {args.model}")
    _check_spec(parser, args.spec)
    if args.categories is not None and not _split(args.categories):
        parser.error("--categories: give at least one category")
    if args.max_tokens >= args.max_model_len:
        parser.error(f"--max-tokens must be < --max-model-len ({args.max_model_len}), got {args.max_tokens}")
    from specserve.bench.serve import run_serve_bench

    try:
        report = run_serve_bench(
            model=args.model,
            dtype=args.dtype,
            spec=args.spec,
            num_spec_tokens=args.num_spec_tokens,
            requests=args.requests,
            duration=args.duration,
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            n_per_category=args.n_per_category,
            categories=_split(args.categories),
            out_dir=args.out,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        parser.error(_one_line(exc))
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args.parser, args)  # the command's own parser: `specserve generate: error: ...`
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `specserve generate ... | head -1`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
