"""Target forwards on this checkout's native library and on another revision's, alternated.

    .venv/bin/python scripts/ab_native.py --rev HEAD~1
    .venv/bin/python scripts/ab_native.py --rev main --context 1000 --shapes 1x1,1x2,4x1,16x1

On a shared machine two benchmark runs are not comparable: the load of the neighbours
moves figures by 10-20% between minutes. This script loads the default model once, builds
the native library of the same kind (AMX or AVX2) from `git show REV:<source>`, and times
each forward shape (S sequences x N new tokens over C cached tokens, every row's logits,
as `specserve bench forward`) on the two libraries in turn, the order swapped at every
repetition. The weights, the cache and the inputs are the same objects; only the library
the calls go to changes. Prints the median and the best per library and new / old of the
medians.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from specserve.api import LLM
from specserve.bench.forward import ScratchBatch
from specserve.engine.runner import ForwardItem
from specserve.model import native

ROOT = Path(__file__).resolve().parent.parent


def library_at(rev: str, kind: str) -> object:
    """The native library of `kind` built from its source at git revision `rev`."""
    source = {k: src for k, src, _ in native.KINDS}[kind]
    rel = source.relative_to(ROOT).as_posix()
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        # a stem of its own: a build prunes older builds of the same stem only
        path = Path(tmp) / f"ab-{source.stem}.cpp"
        path.write_bytes(text)
        lib = native.open_library(native.build(path))
    if lib is None:
        raise SystemExit(f"the {kind} library at {rev} did not initialise")
    if hasattr(lib, "ss_set_wide_rows") and hasattr(current := native.library(), "ss_wide_rows"):
        lib.ss_set_wide_rows(current.ss_wide_rows())  # the prompt-chunk path this CPU was found faster on
    return lib


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes: a comma-separated list of SEQSxTOKENS (e.g. 1x1,4x2), got {text!r}")
    return shapes  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--context", type=int, default=300, help="cached tokens per sequence (default: 300)")
    parser.add_argument("--shapes", default="1x1,1x2,1x3,1x4,4x1,4x2,16x1", help="SEQSxTOKENS list")
    parser.add_argument("--repetitions", type=int, default=11, help="forwards per shape and library (default: 11)")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)
    if args.context < 1 or args.repetitions < 1:
        raise SystemExit("--context and --repetitions must be >= 1")
    seqs, tokens = max(s for s, _ in shapes), max(n for _, n in shapes)
    llm = LLM(max_num_seqs=seqs, max_model_len=args.context + tokens + 1)
    model = llm.engine.runner.model
    if model.native is None:
        raise SystemExit(f"this model does not run on the native layers: {native.describe(model)}")
    new = model.native.lib
    kind = native.kind_of(new)
    old = library_at(args.rev, kind)
    batch = ScratchBatch(model, native.kv_dtype(model), args.context, seqs, tokens)
    gen = torch.Generator().manual_seed(0)
    times: dict[tuple[int, int, str], list[float]] = {}

    def use(lib) -> None:
        model.native.lib = lib
        if model.native_head is not None:
            model.native_head.lib = lib

    print(f"library: {kind}; this checkout against {args.rev}; {args.context} cached tokens per sequence")
    try:
        with torch.inference_mode():
            for rep in range(args.repetitions + 1):  # the first round warms up, untimed
                for s, n in shapes:
                    items = [ForwardItem(slot, args.context, torch.randint(0, 1000, (n,), generator=gen).tolist(),
                                         logits_from=0) for slot in batch.slots[:s]]
                    order = (("new", new), ("old", old)) if rep % 2 else (("old", old), ("new", new))
                    for name, lib in order:
                        use(lib)
                        t0 = time.perf_counter()
                        batch.runner.forward(items)
                        if rep:
                            times.setdefault((s, n, name), []).append(1e3 * (time.perf_counter() - t0))
    finally:
        use(new)
    mid = args.repetitions // 2
    print("| shape | old median (best), ms | new median (best), ms | new / old |")
    print("|---|---:|---:|---:|")
    for s, n in shapes:
        o, w = sorted(times[(s, n, "old")]), sorted(times[(s, n, "new")])
        print(f"| {s} x {n} | {o[mid]:.2f} ({o[0]:.2f}) | {w[mid]:.2f} ({w[0]:.2f}) | {w[mid] / o[mid]:.3f} |")


if __name__ == "__main__":
    main()
