"""What a step's draft rows add to a forward of S decoding sequences, K drafts spread over them.

    .venv/bin/python scripts/draft_rows.py
    .venv/bin/python scripts/draft_rows.py --seqs 4,8 --drafts 0,1,2,4,8 --repetitions 15

`specserve bench forward` times S sequences of N tokens each. A verification step is
ragged: S sequences with K draft rows in all, K = 1 on one sequence only when the policy
drafts once. This loads the default model, puts `--context` real cached tokens on each
sequence, and times forwards of every (S, K) in turn, all shapes in each round, greedy
rows as verification takes them (the screened LM head where it applies). Prints the
median per shape and what the K drafts add to K = 0. The load-aware policy's cost table
measures K = 1 the same way (`measure_forward_cost`'s `one_more`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specserve.api import LLM
from specserve.bench.forward import ScratchBatch
from specserve.engine.runner import ForwardItem
from specserve.model import native


def counts(text: str, flag: str, low: int) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        values = []
    if not values or values[0] < low:
        raise SystemExit(f"{flag}: a comma-separated list of integers >= {low}, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1,2,4,8", help="sequence counts S (default: 1,2,4,8)")
    parser.add_argument("--drafts", default="0,1,2,3,4,8", help="draft rows K in all (default: 0,1,2,3,4,8)")
    parser.add_argument("--context", type=int, default=300, help="cached tokens per sequence (default: 300)")
    parser.add_argument("--repetitions", type=int, default=9, help="timed rounds (default: 9)")
    args = parser.parse_args()
    seqs, drafts = counts(args.seqs, "--seqs", 1), counts(args.drafts, "--drafts", 0)
    if args.context < 1 or args.repetitions < 1:
        raise SystemExit("--context and --repetitions must be >= 1")
    if 0 not in drafts:
        drafts = [0, *drafts]
    most = max(-(-k // s) for s in seqs for k in drafts)  # the most drafts one sequence gets
    llm = LLM(max_num_seqs=max(seqs), max_model_len=args.context + most + 2)
    model = llm.engine.runner.model
    batch = ScratchBatch(model, native.kv_dtype(model), args.context, max(seqs), most + 1)
    gen = torch.Generator().manual_seed(0)
    times: dict[tuple[int, int], list[float]] = {}
    with torch.inference_mode():
        for rep in range(args.repetitions + 1):  # the first round warms up, untimed
            for s in seqs:
                for k in drafts:
                    extra = [k // s + (1 if i < k % s else 0) for i in range(s)]
                    items = [ForwardItem(slot, args.context, torch.randint(0, 1000, (1 + e,), generator=gen).tolist(),
                                         logits_from=0) for slot, e in zip(batch.slots[:s], extra)]
                    t0 = time.perf_counter()
                    batch.runner.forward(items, greedy=True)
                    if rep:
                        times.setdefault((s, k), []).append(1e3 * (time.perf_counter() - t0))
    print(f"{native.describe(model)}; {args.context} cached tokens per sequence; medians of {args.repetitions}, ms")
    print("| S | " + " | ".join(f"K={k}" for k in drafts) + " |")
    print("|---:|" + "---:|" * len(drafts))
    for s in seqs:
        medians = [statistics.median(times[(s, k)]) for k in drafts]
        cells = [f"{medians[0]:.1f}"] + [f"{m:.1f} (+{m - medians[0]:.1f})" for m in medians[1:]]
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
