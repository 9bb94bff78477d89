"""How far back the EAGLE head reads: acceptance with less context than the whole prompt.

    .venv/bin/python scripts/eagle_context.py --windows 16,64,100000
    .venv/bin/python scripts/eagle_context.py --second-turns

`--windows`: Spec-Bench first turns (one per category), `eagle` at a fixed budget of
`--budget` tree nodes, greedy, run with each catch-up window (`EagleDrafter.window`) in
turn over `--repetitions`; prints AL and tok/s per window. `--second-turns`: the MT-Bench
second turns (first turn, the model's own answer, second turn), load-aware `eagle`, each
run cold and with the conversation so far taken from the prefix cache (the head then
starts a few rows before the end of the prompt); prints AL and tok/s of both.
"""

from __future__ import annotations

import argparse
import time

from specserve.api import LLM
from specserve.bench.common import build_prompts, select_questions
from specserve.bench.harness import prepare_prompts
from specserve.sampling.params import SamplingParams

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def totals(outs) -> tuple[int, int]:
    return sum(o.metrics.generated_tokens for o in outs), sum(o.metrics.forward_passes for o in outs)


def windows(args: argparse.Namespace) -> None:
    llm = LLM(spec="eagle", num_spec_tokens=args.budget, adaptive_spec=False)
    prompts = build_prompts(llm, select_questions(None, 1))
    params = SamplingParams(max_tokens=args.max_tokens)
    drafter = llm.engine.drafter
    for rep in range(args.repetitions):
        for w in [int(x) for x in args.windows.split(",")]:
            drafter.window = w
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = [llm.generate([p.token_ids], params)[0] for p in prompts]
            gen, fwd = totals(outs)
            print(f"repetition {rep}, window {w}: AL {gen / fwd:.3f}, {gen / (time.perf_counter() - t0):.1f} tok/s")


def second_turns(args: argparse.Namespace) -> None:
    llm = LLM(spec="eagle")
    prompts = prepare_prompts(llm, select_questions(None, 1, MT_BENCH), True, args.max_tokens)
    seconds = [p for p in prompts if p.turn == 2]
    params = SamplingParams(max_tokens=args.max_tokens)
    sums = {"cold": [0, 0, 0.0], "cached": [0, 0, 0.0]}
    for p in seconds:
        for mode in ("cold", "cached"):
            llm.reset_prefix_cache()
            if mode == "cached":  # the conversation so far, cached as a prefix of the second turn
                llm.generate([p.token_ids[:-1]], SamplingParams(max_tokens=2))
            t0 = time.perf_counter()
            out = llm.generate([p.token_ids], params)[0]
            s = sums[mode]
            s[0] += out.metrics.generated_tokens
            s[1] += out.metrics.forward_passes
            s[2] += time.perf_counter() - t0
            print(f"{mode}: prompt {len(p.token_ids)}, from the cache {out.metrics.cached_tokens}, "
                  f"AL {out.metrics.generated_tokens / out.metrics.forward_passes:.2f}")
    for mode, (gen, fwd, secs) in sums.items():
        print(f"{mode}: AL {gen / fwd:.3f}, {gen / secs:.1f} tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", help="catch-up windows to compare, e.g. 16,64,100000")
    ap.add_argument("--second-turns", action="store_true", help="second turns, cold against prefix-cached")
    ap.add_argument("--budget", type=int, default=4, help="tree nodes per step with --windows (default 4)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repetitions", type=int, default=2)
    args = ap.parse_args()
    if bool(args.windows) == args.second_turns:
        raise SystemExit("give one of --windows LIST and --second-turns")
    windows(args) if args.windows else second_turns(args)


if __name__ == "__main__":
    main()
