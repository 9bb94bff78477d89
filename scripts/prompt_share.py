"""Where one-at-a-time decoding spends its time: reading prompts or decoding, plain and speculative.

    .venv/bin/python scripts/prompt_share.py                   # plain against ngram+eagle
    .venv/bin/python scripts/prompt_share.py --spec ngram --prompts 6

Loads the default model once and decodes the first Spec-Bench question of each category
(first turn, chat template, greedy, 128 tokens) with plain decoding and with the load-aware
`--spec` method in turn, the order swapped at every repetition. Target forwards that read a
prompt are timed apart from the rest. Prints tokens/s overall, the prompts' share of the
time and the time per generated token of the rest (decoding, drafting included), and the
speculative/plain ratio overall and of decoding alone: speculation speeds up decoding,
not the reading of prompts, so the overall ratio is the decoding ratio diluted.
"""
from __future__ import annotations

import argparse
import time

from specserve import LLM, SamplingParams
from specserve.bench.workload import load_questions, select_per_category


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="ngram+eagle", help="the speculative method (load-aware budgets)")
    ap.add_argument("--prompts", type=int, default=13, help="categories to take a question from")
    ap.add_argument("--repetitions", type=int, default=2)
    args = ap.parse_args()
    llm = LLM(max_num_seqs=4, max_model_len=2048)
    firsts = select_per_category(load_questions(), 1)  # the first question of each category
    prompts = [llm.chat_prompt([{"role": "user", "content": q.turns[0]}]) for q in firsts][: args.prompts]
    runner = llm.engine.runner
    forward = runner.forward
    reading = [0.0]  # seconds of forwards that read a prompt, this request

    def timed(items, **kw):
        t0 = time.perf_counter()
        out = forward(items, **kw)
        if any(it.logits_from != 0 for it in items):  # a prompt chunk (decode rows take every row's logits)
            reading[0] += time.perf_counter() - t0
        return out

    runner.forward = timed
    methods = ("plain", args.spec)
    setups = {m: llm.build_spec(None if m == "plain" else m, None, adaptive=m != "plain") for m in methods}
    res = {m: {"total": 0.0, "tokens": 0, "prompt": 0.0} for m in methods}
    for rep in range(args.repetitions):
        for m in methods if rep % 2 == 0 else methods[::-1]:
            llm.use_spec(setups[m])
            for prompt in prompts:
                llm.reset_prefix_cache()
                reading[0] = 0.0
                t0 = time.perf_counter()
                out = llm.generate([prompt], SamplingParams(max_tokens=128))[0]
                r = res[m]
                r["total"] += time.perf_counter() - t0
                r["tokens"] += len(out.token_ids)
                r["prompt"] += reading[0]
    for m, r in res.items():
        decoding = r["total"] - r["prompt"]
        print(f"{m}: {r['tokens'] / r['total']:.1f} tok/s overall; prompt forwards {r['prompt']:.1f} s of "
              f"{r['total']:.1f} s ({r['prompt'] / r['total']:.0%}); "
              f"decoding {1000 * decoding / r['tokens']:.2f} ms a token")
    p, e = res["plain"], res[args.spec]
    decoding_ratio = (p["total"] - p["prompt"]) / (e["total"] - e["prompt"])
    print(f"overall {p['total'] / e['total']:.3f}x; decoding alone {decoding_ratio:.3f}x")


if __name__ == "__main__":
    main()
