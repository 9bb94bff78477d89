"""Greedy decoding with the screened LM head and with the full one, alternated in one process.

    .venv/bin/python scripts/ab_screen.py                      # plain decoding, one request at a time
    .venv/bin/python scripts/ab_screen.py --spec ngram+eagle --repetitions 3
    .venv/bin/python scripts/ab_screen.py --batch 2            # two requests at once (2-row steps)
    .venv/bin/python scripts/ab_screen.py --head               # the LM head call alone, 1-4 rows

The AVX2 library screens greedy rows through an int8 copy of the LM head (docs/native.md,
"An exact greedy LM head that reads half the bytes"). This script loads the default model
once and decodes the first Spec-Bench question of each category (first turn, chat
template, `--max-tokens` tokens) with the screen on and off in turn, the order swapped at
every repetition, so both see the same minutes of a shared machine. Prints tokens/s, ms per
step and acceptance length per mode, the ratio of the two, and whether every output is
the same token for token. `--head` times the LM head calls alone instead, on hidden states
of real decoding steps: the full head and the screened one alternated, 1 to 4 rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specserve import LLM, SamplingParams
from specserve.bench.workload import load_questions, select_per_category


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=None, help="a --spec method (load-aware budgets); default: plain decoding")
    p.add_argument("--repetitions", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=6, help="categories to take a question from")
    p.add_argument("--batch", type=int, default=1, help="requests decoded together")
    p.add_argument("--head", action="store_true", help="time the LM head calls alone")
    args = p.parse_args()
    llm = LLM(max_num_seqs=max(4, args.batch), max_model_len=2048)
    head = llm.model.native_head
    screen = head.screen if head is not None else None
    if screen is None:
        raise SystemExit("no screened LM head here: it needs the AVX2 library (specserve info) and SPECSERVE_SCREEN unset")
    firsts = select_per_category(load_questions(), 1)  # the first question of each category
    prompts = [llm.chat_prompt([{"role": "user", "content": q.turns[0]}]) for q in firsts][: args.prompts]
    if args.head:
        return time_head(llm, head, prompts, args.repetitions)
    batches = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]
    llm.set_spec(args.spec, None, adaptive=args.spec is not None)
    params = SamplingParams(max_tokens=args.max_tokens)
    llm.generate([prompts[0]], SamplingParams(max_tokens=16))  # warm-up
    totals = {mode: [0, 0.0, 0] for mode in ("full", "screened")}  # tokens, seconds, forwards
    outputs: dict[str, list[list[int]]] = {mode: [] for mode in totals}
    for rep in range(args.repetitions):
        for batch in batches:
            for mode in ("full", "screened") if rep % 2 == 0 else ("screened", "full"):
                head.screen = screen if mode == "screened" else None
                llm.reset_prefix_cache()
                t0 = time.perf_counter()
                outs = llm.generate(batch, params)
                seconds = time.perf_counter() - t0
                t = totals[mode]
                t[0] += sum(len(o.token_ids) for o in outs)
                t[1] += seconds
                t[2] += max(o.metrics.forward_passes for o in outs)
                if rep == 0:
                    outputs[mode] += [o.token_ids for o in outs]
    head.screen = screen
    label = args.spec or "plain"
    for mode, (n, s, f) in totals.items():
        print(f"{label}, batch {args.batch}, {mode} head: {n / s:.1f} tok/s, {1000 * s / f:.2f} ms per step, AL {n / f / args.batch:.2f}")
    speed = {mode: n / s for mode, (n, s, _) in totals.items()}
    same = sum(a == b for a, b in zip(outputs["full"], outputs["screened"]))
    print(f"screened / full: {speed['screened'] / speed['full']:.3f}x; identical outputs {same}/{len(outputs['full'])}")


def time_head(llm: LLM, head, prompts: list[str], repetitions: int) -> None:
    """Median ms of `head(x)` and `head.argmax_logits(x)` alternated, x the final hidden
    states of 1-4 consecutive rows of real decoding steps."""
    model = llm.model
    rows: list[torch.Tensor] = []
    plain = model.greedy_tokens

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        rows.append(hidden.detach().clone())
        return plain(hidden)

    model.greedy_tokens = capture
    try:
        llm.generate(prompts, SamplingParams(max_tokens=64))
    finally:
        del model.greedy_tokens
    states = torch.cat([r for r in rows if r.shape[0] <= 8])
    for m in (1, 2, 3, 4):
        times: dict[str, list[float]] = {"full": [], "screened": []}
        for rep in range(max(30, 10 * repetitions)):
            x = states[(rep * m) % (states.shape[0] - m) :][:m].contiguous()
            for mode in ("full", "screened") if rep % 2 == 0 else ("screened", "full"):
                t0 = time.perf_counter()
                head(x) if mode == "full" else head.argmax_logits(x)
                times[mode].append(time.perf_counter() - t0)
        full, screened = (1000 * statistics.median(times[k]) for k in ("full", "screened"))
        print(f"{m} row{'s' if m > 1 else ''}: full {full:.2f} ms, screened {screened:.2f} ms, {screened / full:.2f}x")


if __name__ == "__main__":
    main()
