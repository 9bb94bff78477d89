"""The native library's linears on this checkout and on another revision, alternated.

    .venv/bin/python scripts/ab_linear.py --rev HEAD~1
    .venv/bin/python scripts/ab_linear.py --rev HEAD~1 --rows 4,5,8,16 --repetitions 41
    .venv/bin/python scripts/ab_linear.py --rev HEAD --other HEAD   # the noise floor

`scripts/ab_native.py` times whole forwards; this times `ss_linear` alone, over the
shapes of the default model's 30 decoder layers (q, k, v, o, gate, up, down), each layer
with weights of its own so that they stream from memory as a forward's do. Random bf16
values: the time of a linear does not depend on them. Both libraries are built for this
CPU (AMX or AVX2, whichever loads here), called on the same buffers, the order swapped at
every repetition. Prints, per row count, the median and the best per library and the
median of the paired ratios new / old.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np
from ab_native import library_at

from specserve.model import native

LAYERS = 30
HIDDEN, KV, INTERMEDIATE = 576, 192, 1536
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE),
          (HIDDEN, INTERMEDIATE), (INTERMEDIATE, HIDDEN)]  # (inputs K, outputs N)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with (e.g. HEAD~1)")
    parser.add_argument("--other", default=None, help="a revision in place of this checkout (default: this checkout)")
    parser.add_argument("--rows", default="1,2,4,5,6,8,12,16", help="row counts (default: 1,2,4,5,6,8,12,16)")
    parser.add_argument("--repetitions", type=int, default=21, help="timed rounds (default: 21)")
    args = parser.parse_args()
    try:
        rows = [int(v) for v in args.rows.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1 or max(rows) > 256:
        raise SystemExit(f"--rows: a comma-separated list of row counts in 1..256, got {args.rows!r}")
    if args.repetitions < 1:
        raise SystemExit("--repetitions must be >= 1")
    current = native.library()
    if current is None:
        raise SystemExit("no native library loads on this machine (specserve info)")
    kind = native.kind_of(current)
    new = current if args.other is None else library_at(args.other, kind)
    old = library_at(args.rev, kind)
    ptr = ctypes.c_void_p
    for lib in (new, old):
        lib.ss_linear.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.ss_linear.restype = None
    rng = np.random.default_rng(0)
    shapes = SHAPES * LAYERS
    weights = [rng.integers(0x3C00, 0x3F80, size=k * n, dtype=np.uint16) for k, n in shapes]  # about 0.01-1
    x = rng.integers(0x3C00, 0x3F80, size=max(rows) * INTERMEDIATE, dtype=np.uint16)
    y = np.zeros(max(rows) * INTERMEDIATE, dtype=np.uint16)

    def run(lib, m: int) -> float:
        t0 = time.perf_counter()
        for (k, n), w in zip(shapes, weights):
            lib.ss_linear(w.ctypes.data, None, x.ctypes.data, y.ctypes.data, m, k, n)
        return 1e3 * (time.perf_counter() - t0)

    times: dict[tuple[int, str], list[float]] = {}
    for rep in range(args.repetitions + 1):  # the first round warms up, untimed
        for m in rows:
            order = (("new", new), ("old", old)) if rep % 2 else (("old", old), ("new", new))
            for name, lib in order:
                t = run(lib, m)
                if rep:
                    times.setdefault((m, name), []).append(t)
    print(f"library: {kind}; {args.other or 'this checkout'} against {args.rev}; {LAYERS} layers of linears")
    print("| rows | old median (best), ms | new median (best), ms | new / old (median of pairs) |")
    print("|---:|---:|---:|---:|")
    for m in rows:
        o, w = times[(m, "old")], times[(m, "new")]
        ratio = statistics.median(a / b for a, b in zip(w, o))
        print(f"| {m} | {statistics.median(o):.2f} ({min(o):.2f}) | {statistics.median(w):.2f} ({min(w):.2f}) "
              f"| {ratio:.3f} |")


if __name__ == "__main__":
    main()
