"""Second turns of conversations after other conversations ran: how much of their prompt
the prefix cache still holds, under this checkout's block placement and the one before
2026-12-02 (growth took the next block even when it was another request's cached block).

    .venv/bin/python scripts/prefix_turns.py
    .venv/bin/python scripts/prefix_turns.py --conversations 6 --repetitions 3
    .venv/bin/python scripts/prefix_turns.py --spec ngram+eagle   # also the second turns' AL

Loads the default model once. Each repetition and placement: an empty prefix cache, the
first turn of every conversation (the first two-turn Spec-Bench question of each category, chat
template with the model's system prompt, greedy, 64 tokens), one at a time; then every
second turn (the first turn, the model's answer, the question's second turn), one at a
time. Prints the second turns' prompt tokens served from the cache and their median time
to first token, per placement, the two placements alternated in one process; with
`--spec`, also their acceptance length (an EAGLE head has no features for the prompt
tokens a cache hit skips).
"""

from __future__ import annotations

import argparse
import statistics

from specserve import LLM, SamplingParams
from specserve.bench.workload import load_questions, select_per_category
from specserve.cache.kv_cache import KVCache

TAKE_BLOCK = KVCache._take_block  # this checkout's placement


def take_block_before(self: KVCache, preferred: int | None) -> int:
    """The placement before 2026-12-02: the next block even when it is a cached block nobody holds."""
    if preferred is not None and preferred < self.num_blocks and self._refs[preferred] == 0 and preferred in self._key_of:
        del self._evictable[preferred]
        del self._block_of[self._key_of.pop(preferred)]
        self._refs[preferred] = 1
        return preferred
    return TAKE_BLOCK(self, preferred)



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=13, help="categories to take a question from")
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--spec", default=None, help="a speculative method for both turns (load-aware budgets)")
    args = ap.parse_args()
    llm = LLM(max_num_seqs=4, max_model_len=2048, spec=args.spec)
    questions = select_per_category([q for q in load_questions() if len(q.turns) > 1], 1)[: args.conversations]
    params = SamplingParams(max_tokens=64)
    results: dict[str, list[tuple[int, int, float, int, int]]] = {"this checkout": [], "before": []}
    for rep in range(args.repetitions):
        order = list(results) if rep % 2 == 0 else list(reversed(results))
        for placement in order:
            KVCache._take_block = TAKE_BLOCK if placement == "this checkout" else take_block_before
            try:
                llm.reset_prefix_cache()
                firsts = [[{"role": "user", "content": q.turns[0]}] for q in questions]
                answers = [llm.chat(conv, params)[0].text for conv in firsts]
                for q, conv, answer in zip(questions, firsts, answers):
                    turn = [*conv, {"role": "assistant", "content": answer}, {"role": "user", "content": q.turns[1]}]
                    out = llm.chat(turn, params)[0]
                    m = out.metrics
                    results[placement].append(
                        (m.cached_tokens, len(out.prompt_token_ids), m.ttft, m.generated_tokens, m.forward_passes)
                    )
            finally:
                KVCache._take_block = TAKE_BLOCK
    print(f"{len(questions)} second turns x {args.repetitions} repetitions, each after all first turns")
    print(f"| placement | prompt tokens from the cache | median TTFT, ms | AL ({args.spec or 'plain'}) |")
    print("|---|---:|---:|---:|")
    for placement, rows in results.items():
        cached, total = sum(r[0] for r in rows), sum(r[1] for r in rows)
        ttft = statistics.median(r[2] for r in rows) * 1000
        al = sum(r[3] for r in rows) / sum(r[4] for r in rows)
        print(f"| {placement} | {cached:,} of {total:,} ({cached / total:.0%}) | {ttft:.0f} | {al:.2f} |")


if __name__ == "__main__":
    main()
