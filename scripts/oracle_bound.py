"""How fast a drafter could make a batch if only its right drafts were verified: an upper bound.

    .venv/bin/python scripts/oracle_bound.py --concurrency 1,2,4
    .venv/bin/python scripts/oracle_bound.py --concurrency 4 --methods off,ngram+load-aware,oracle:ngram@8

Runs `specserve bench throughput`'s workload (Spec-Bench first turns, chat template, greedy,
categories interleaved, `concurrency` requests kept in flight) for each method, the methods
alternated over `--repetitions` in one process, with the bench's method names (`off`,
`DRAFTER@B`, `DRAFTER+load-aware`, `oracle:DRAFTER@B`). An `oracle:` row is the drafter
asked for B drafts (tree nodes) for every sequence at every step, its proposals cut to the
drafts verification will accept (`specserve.bench.oracle`): an upper bound for a draft-length
policy over that drafter. Prints what the bench prints (tokens/s summed over the
repetitions, the ratio to `off`, the acceptance length, outputs identical to `off`) and,
for the oracle rows, the drafter's milliseconds per call, which the bound pays in full.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

from specserve import LLM, SamplingParams
from specserve.bench.common import build_prompts, select_questions
from specserve.bench.throughput import ORACLE, interleave_categories, run_level, use_method


def timed_propose(drafter, seconds: dict[str, float]) -> None:
    """Count the drafter's calls and time spent proposing (its catch-up included)."""
    propose = drafter.propose

    def wrapper(seqs, budgets):
        t0 = time.perf_counter()
        out = propose(seqs, budgets)
        seconds["propose"] += time.perf_counter() - t0
        seconds["calls"] += 1
        return out

    drafter.propose = wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="1,2,4")
    ap.add_argument("--requests", type=int, default=26)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--methods", default="off,ngram+eagle+load-aware,oracle:ngram@8,oracle:ngram+eagle@10")
    ap.add_argument("--repetitions", type=int, default=2)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    methods = args.methods.split(",")
    if methods[0] != "off":
        raise SystemExit("--methods must start with off (the oracle reads its outputs)")
    llm = LLM(max_num_seqs=max(levels), max_model_len=2048)
    prompts = interleave_categories(build_prompts(llm, select_questions(None, -(-args.requests // 13))))
    prompts = prompts[: args.requests]
    params = SamplingParams(max_tokens=args.max_tokens)
    llm.generate([prompts[0].token_ids], SamplingParams(max_tokens=8))
    for c in levels:
        truth: dict[int, list[int]] = {}
        stats = {m: defaultdict(float) for m in methods}
        for rep in range(args.repetitions):
            for method in methods:
                use_method(llm, method, None, truth if truth else None)  # None: each drafter's own length
                if method.startswith(ORACLE):
                    timed_propose(llm.engine.drafter.inner, stats[method])
                llm.reset_prefix_cache()
                seqs, wall = run_level(llm, prompts, params, c)
                outputs = [list(s.output_ids) for s in seqs]
                if method == "off" and not truth:
                    truth.update(enumerate(outputs))
                s = stats[method]
                s["wall"] += wall
                s["tokens"] += sum(len(o) for o in outputs)
                s["forwards"] += sum(q.metrics.forward_passes for q in seqs)
                s["identical"] += sum(o == truth[i] for i, o in enumerate(outputs))
                s["runs"] += len(outputs)
                print(f"c={c} rep {rep + 1} {method}: {s['tokens'] / s['wall']:.1f} tok/s so far", flush=True)
        base = stats["off"]["tokens"] / stats["off"]["wall"]
        print(f"\nc={c}, {len(prompts)} requests, {args.max_tokens} tokens, {args.repetitions} repetitions (summed)")
        print("| method | tok/s | ratio to off | AL | drafter ms/call | identical to off |")
        print("|---|---:|---:|---:|---:|---:|")
        for m in methods:
            s = stats[m]
            tps = s["tokens"] / s["wall"]
            al = s["tokens"] / max(s["forwards"], 1)
            drafter = f"{1000 * s['propose'] / max(s['calls'], 1):.2f}" if m.startswith(ORACLE) else "-"
            print(f"| {m} | {tps:.1f} | {tps / base:.2f}x | {al:.2f} | {drafter} | {int(s['identical'])}/{int(s['runs'])} |")
        print(flush=True)


if __name__ == "__main__":
    main()
