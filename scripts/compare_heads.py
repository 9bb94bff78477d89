#!/usr/bin/env python3
"""Plain decoding and each `--spec` named on the command line (e.g. `eagle eagle:DIR`, a
packaged head against a newly trained one), side by side in one run: greedy, the first
Spec-Bench question of each category (first turn, chat template), 128 tokens, batch size 1,
load-aware budgets (`SPEC@N`: a fixed budget of N draft tokens instead). Prints tokens/s,
acceptance length, accepted drafts per depth and how many outputs equal plain decoding's.

    .venv/bin/python scripts/compare_heads.py eagle eagle:heads/eagle eagle@4
"""

from __future__ import annotations

import sys
import time

from specserve import LLM, SamplingParams
from specserve.bench.workload import load_questions, select_per_category
from specserve.equivalence import first_divergence


def main(specs: list[str]) -> None:
    llm = LLM(max_num_seqs=4, max_model_len=2048)
    firsts = select_per_category(load_questions(), 1)  # the first question of each category
    prompts = [llm.chat_prompt([{"role": "user", "content": q.turns[0]}]) for q in firsts]
    params = SamplingParams(max_tokens=128)
    plain: list[list[int]] = []
    for spec in [None, *specs]:
        method, at, fixed = (spec or "").partition("@")
        llm.set_spec(method or None, int(fixed) if at else None, adaptive=not at)
        llm.generate([prompts[0]], SamplingParams(max_tokens=16))  # warm-up
        tokens = forwards = drafted = accepted = 0
        wall, outs, per_depth = 0.0, [], []
        for p in prompts:
            llm.reset_prefix_cache()
            t0 = time.perf_counter()
            out = llm.generate([p], params)[0]
            wall += time.perf_counter() - t0
            m = out.metrics
            outs.append(out.token_ids)
            tokens, forwards = tokens + len(out.token_ids), forwards + m.forward_passes
            drafted, accepted = drafted + m.drafted_tokens, accepted + m.accepted_tokens
            for depth, n in enumerate(m.accepted_per_position):
                per_depth.extend([0] * (depth + 1 - len(per_depth)))
                per_depth[depth] += n
        plain = plain or outs
        same = sum(first_divergence(a, b) is None for a, b in zip(plain, outs))
        print(f"{spec or 'plain'}: {tokens / wall:.1f} tok/s, AL {tokens / forwards:.2f}, drafted {drafted}, "
              f"accepted {accepted} (per depth {per_depth}), identical to plain {same}/{len(prompts)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
