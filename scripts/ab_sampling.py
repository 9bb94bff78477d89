"""Sampled decoding on this checkout's sampling code and on another revision's, alternated.

    .venv/bin/python scripts/ab_sampling.py --rev 69bec9b
    .venv/bin/python scripts/ab_sampling.py --rev 69bec9b --spec ngram --temperature 0.7

Loads the default model once and decodes the first Spec-Bench question of each category
(first turn, chat template, `--max-tokens` tokens, seeded) with the functions a sampled
step calls (`processed_logits` in `specserve/engine/engine.py`, `sample` in
`specserve/sampling/sampler.py`, `verify` in `specserve/sampling/verifier.py`) taken from
this checkout and from `git show REV:...` in turn, the order swapped at every repetition,
so both see the same minutes of a shared machine. Prints tokens/s and ms per step for
each, their ratio, and whether every output is the same token for token (the revisions
must draw the same tokens from the same seeds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

from specserve import LLM, SamplingParams
from specserve.bench.workload import load_questions, select_per_category
from specserve.engine import engine as engine_mod

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = (  # (module path, function name) the engine calls by its module-level name
    ("src/specserve/engine/engine.py", "processed_logits"),
    ("src/specserve/sampling/sampler.py", "sample"),
    ("src/specserve/sampling/verifier.py", "verify"),
)


def functions_at(rev: str) -> dict[str, object]:
    """The FUNCTIONS as defined at git revision `rev` (each module's source run afresh)."""
    out = {}
    for path, name in FUNCTIONS:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, check=True).stdout
        module = types.ModuleType(f"ab_{name}")
        module.__file__ = str(ROOT / path)
        module.__package__ = path.removeprefix("src/").rpartition("/")[0].replace("/", ".")  # relative imports
        sys.modules[module.__name__] = module  # dataclasses look their module up there
        exec(compile(text, module.__file__, "exec"), module.__dict__)
        out[name] = getattr(module, name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="the revision to compare with")
    p.add_argument("--spec", default=None, help="a --spec method (load-aware budgets); default: plain decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=6, help="categories to take a question from")
    args = p.parse_args()
    versions = {"new": {name: getattr(engine_mod, name) for _, name in FUNCTIONS}, "old": functions_at(args.rev)}
    llm = LLM(max_num_seqs=4, max_model_len=2048)
    firsts = select_per_category(load_questions(), 1)  # the first question of each category
    prompts = [llm.chat_prompt([{"role": "user", "content": q.turns[0]}]) for q in firsts][: args.prompts]
    llm.set_spec(args.spec, None, adaptive=args.spec is not None)
    llm.generate([prompts[0]], SamplingParams(max_tokens=16))  # warm-up
    totals = {mode: [0, 0.0, 0] for mode in versions}  # tokens, seconds, forwards
    outputs: dict[str, list[list[int]]] = {mode: [] for mode in versions}
    for rep in range(args.repetitions):
        for mode in ("old", "new") if rep % 2 == 0 else ("new", "old"):
            for name, fn in versions[mode].items():
                setattr(engine_mod, name, fn)
            for i, prompt in enumerate(prompts):
                llm.reset_prefix_cache()
                params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=1000 * rep + i)
                t0 = time.perf_counter()
                out = llm.generate([prompt], params)[0]
                t = totals[mode]
                t[0] += len(out.token_ids)
                t[1] += time.perf_counter() - t0
                t[2] += out.metrics.forward_passes
                outputs[mode].append(out.token_ids)
    for name, fn in versions["new"].items():
        setattr(engine_mod, name, fn)
    label = f"{args.spec or 'plain'}, temperature {args.temperature}"
    for mode, (n, s, f) in totals.items():
        print(f"{label}, {mode} ({args.rev if mode == 'old' else 'this checkout'}): {n / s:.1f} tok/s, "
              f"{1000 * s / f:.2f} ms per step, AL {n / f:.2f}")
    speed = {mode: n / s for mode, (n, s, _) in totals.items()}
    same = sum(a == b for a, b in zip(outputs["old"], outputs["new"]))
    print(f"new / old: {speed['new'] / speed['old']:.3f}x; identical outputs {same}/{len(outputs['new'])}")


if __name__ == "__main__":
    main()
