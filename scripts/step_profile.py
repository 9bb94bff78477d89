"""Where a batched step's time goes, per speculative method, at one concurrency level.

    .venv/bin/python scripts/step_profile.py --concurrency 32
    .venv/bin/python scripts/step_profile.py --concurrency 4 --methods off,ngram+load-aware
    .venv/bin/python scripts/step_profile.py --concurrency 4 --logits-head   # A/B of the greedy head
    .venv/bin/python scripts/step_profile.py --concurrency 32 --unpriced-catch-up  # A/B of the policy
    .venv/bin/python scripts/step_profile.py --concurrency 1 --other-prompt-path  # A/B of the AVX2 prompt tiles

Loads the default model once and runs `specserve bench throughput`'s workload (Spec-Bench
first turns, chat template, greedy, categories interleaved, `concurrency` requests kept in
flight) for each method, the methods alternated over `--repetitions`. The engine's parts
are wrapped with timers: the policy's plan, the drafter's proposal (an EAGLE head's
catch-up apart), the target forward, verification, the features handed to the drafter,
and the rest of the step. Prints tokens/s, acceptance length, draft tokens per step and
milliseconds per step in each part, summed over the repetitions. With `--logits-head` each
method also runs with greedy tokens taken as before 2026-12-02 (the head's fp32 logits, or on
the AVX2 library its screened logits, then torch's argmax) in place of the fused greedy head,
alternated in the same repetitions (the policy's forward cost table, measured once, is the
fused head's for both);
with `--unpriced-catch-up`, also with the policy blind to a drafter's catch-up backlog (as
before 2026-12-02: the drafter's `pending_rows` hidden from the engine); with
`--other-prompt-path`, also with the AVX2 library's other path for linears of 32 rows and
more (wide tiles where it chose narrow ones, or the reverse; every output the same).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import specserve.engine.engine as engine_module
from specserve import LLM, SamplingParams
from specserve.model.native import NativeLMHead
from specserve.bench.throughput import LOAD_AWARE, interleave_categories, run_level
from specserve.bench.common import build_prompts, select_questions

LOGITS = " (logits + argmax)"
UNPRICED = " (catch-up unpriced)"
OTHER_PATH = " (other prompt path)"
FUSED = NativeLMHead.greedy


def logits_greedy(self: NativeLMHead, hidden):
    """Greedy tokens as before 2026-12-02: the full fp32 logits, then torch's argmax."""
    return self.argmax_logits(hidden).argmax(dim=-1)


PARTS = ("plan", "propose", "catch-up", "forward", "verify", "feed", "observe", "other")


def instrument(llm: LLM, times: dict[str, float], counts: dict[str, int]) -> None:
    """Wrap the engine's current drafter, policy, runner and verification with timers."""
    engine = llm.engine

    def timed(obj, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            times[part] += time.perf_counter() - t0
            if part == "propose":
                times["catch-up"] += out.catch_up_seconds
                times["propose"] -= out.catch_up_seconds
                counts["drafts"] += sum(len(t) for t in out.token_ids)
                counts["drafting calls"] += 1
            return out

        setattr(obj, name, wrapper)

    timed(engine.runner, "forward", "forward")
    timed(engine, "_verify", "verify")
    timed(engine_module, "_walk_greedy", "verify")  # greedy rows: verification from the head's tokens
    timed(engine, "_feed_hidden", "feed")
    timed(engine.policy, "budgets", "plan")
    if engine.drafter is not None:
        timed(engine.drafter, "propose", "propose")
        timed(engine.drafter, "observe", "observe")
    step = engine.step

    def timed_step():
        t0 = time.perf_counter()
        out = step()
        times["step"] += time.perf_counter() - t0
        counts["steps"] += 1
        return out

    engine.step = timed_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=None, help="default: max(26, 2 x concurrency)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--methods", default="off,ngram+load-aware,ngram+eagle+load-aware")
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--logits-head", action="store_true", help="also each method with logits + argmax for greedy rows")
    ap.add_argument("--unpriced-catch-up", action="store_true", help="also each method with the catch-up unpriced")
    ap.add_argument("--other-prompt-path", action="store_true",
                    help="also each method with the AVX2 library's other path for prompt chunks")
    args = ap.parse_args()
    c = args.concurrency
    llm = LLM(max_num_seqs=c, max_model_len=2048)
    n = args.requests or max(26, 2 * c)
    prompts = interleave_categories(build_prompts(llm, select_questions(None, -(-n // 13))))[:n]
    params = SamplingParams(max_tokens=args.max_tokens)
    llm.generate([prompts[0].token_ids], SamplingParams(max_tokens=8))
    methods = args.methods.split(",")
    if args.logits_head:
        methods = [m + suffix for m in methods for suffix in ("", LOGITS)]
    if args.unpriced_catch_up:
        methods = [m + suffix for m in methods for suffix in ("", UNPRICED)]
    lib = llm.engine.runner.model.native.lib if llm.engine.runner.model.native is not None else None
    chosen = lib.ss_wide_rows() if hasattr(lib, "ss_wide_rows") else None
    if args.other_prompt_path:
        if chosen is None:
            raise SystemExit("--other-prompt-path needs the AVX2 library")
        print(f"prompt chunks: {'wide tiles' if chosen else 'narrow tiles'} chosen at load")
        methods = [m + suffix for m in methods for suffix in ("", OTHER_PATH)]
    times = {m: defaultdict(float) for m in methods}
    counts = {m: defaultdict(int) for m in methods}
    for rep in range(args.repetitions):
        for method in methods:
            base = method.removesuffix(OTHER_PATH).removesuffix(UNPRICED).removesuffix(LOGITS)
            if chosen is not None:
                lib.ss_set_wide_rows((0 if chosen else 32) if method.endswith(OTHER_PATH) else chosen)
            spec = None if base == "off" else base.removesuffix(LOAD_AWARE)
            llm.set_spec(spec, adaptive=base.endswith(LOAD_AWARE))
            NativeLMHead.greedy = logits_greedy if LOGITS in method else FUSED
            if method.endswith(UNPRICED) and llm.engine.drafter is not None:
                llm.engine.drafter.pending_rows = None  # the engine reads no backlog
            llm.reset_prefix_cache()
            engine = llm.engine
            saved = {attr: getattr(engine, attr) for attr in ("step", "_verify", "_feed_hidden")}
            walk = engine_module._walk_greedy
            runner_forward = engine.runner.forward
            instrument(llm, times[method], counts[method])
            try:
                seqs, wall = run_level(llm, prompts, params, c)
            finally:
                for attr, fn in saved.items():
                    setattr(engine, attr, fn)
                engine.runner.forward = runner_forward
                engine_module._walk_greedy = walk
                NativeLMHead.greedy = FUSED
            counts[method]["tokens"] += sum(len(s.output_ids) for s in seqs)
            counts[method]["forwards"] += sum(s.metrics.forward_passes for s in seqs)
            times[method]["wall"] += wall
    print(f"c={c}, {n} requests, {args.max_tokens} tokens, {args.repetitions} repetitions")
    print("| method | tok/s | AL | steps | drafts/step | " + " | ".join(f"{p} ms/step" for p in PARTS) + " |")
    print("|---|" + "---:|" * (4 + len(PARTS)))
    for m in methods:
        t, k = times[m], counts[m]
        steps = max(k["steps"], 1)
        inner = sum(t[p] for p in PARTS if p != "other")
        t["other"] = t["step"] - inner
        cells = " | ".join(f"{1000 * t[p] / steps:.2f}" for p in PARTS)
        al = k["tokens"] / max(k["forwards"], 1)
        print(f"| {m} | {k['tokens'] / t['wall']:.1f} | {al:.2f} | {steps} | {k['drafts'] / steps:.2f} | {cells} |")


if __name__ == "__main__":
    main()
