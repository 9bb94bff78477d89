"""Time of the native linear kernel by number of rows, on the default model's shapes.

    .venv/bin/python scripts/linear_rows.py            # weights streamed from memory, as in decoding
    .venv/bin/python scripts/linear_rows.py --hot      # one copy of each weight, held in the caches

Each layer shape gets 30 distinct random weight matrices (the model's 30 layers), so the
weights come from memory as they do in a forward; the LM head is one matrix. Prints the
best of 7 timings per row count, the sum over the shapes (one token's linears) and the
added time per extra row: where it is small the kernel is memory-bound, where it is
large it is compute-bound.
"""

from __future__ import annotations

import argparse
import time

import torch

from specserve.model import native

SHAPES = (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152))
ROWS = (1, 2, 3, 4, 5, 6, 8, 12, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hot", action="store_true", help="one copy of each weight (cache-resident)")
    args = parser.parse_args()
    lib = native.library()
    if lib is None:
        raise SystemExit(f"no native library: {native.unavailable_reason()}")
    print(f"library: {native.kind_of(lib)}")
    torch.manual_seed(0)
    total = [0.0] * len(ROWS)
    for name, k, n in SHAPES:
        copies = 1 if (args.hot or name == "lm_head") else 30
        weights = [native.vnni_pack(torch.randn(n, k, dtype=torch.bfloat16) * 0.02) for _ in range(copies)]
        times = []
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16)
            best = float("inf")
            for _ in range(7):
                t0 = time.perf_counter()
                for w in weights:
                    native.linear(lib, w, None, x)
                best = min(best, time.perf_counter() - t0)
            times.append(1e3 * best)
        total = [a + b for a, b in zip(total, times)]
        print(f"{name:8s} K={k:5d} N={n:5d} x{copies:2d}: " + "  ".join(f"{m} rows {t:6.2f}" for m, t in zip(ROWS, times)) + " ms")
    print("all      " + " " * 21 + "  ".join(f"{m} rows {t:6.2f}" for m, t in zip(ROWS, total)) + " ms")
    print("per extra row: " + "  ".join(f"{m} rows {(t - total[0]) / (m - 1):.2f}" for m, t in zip(ROWS[1:], total[1:])) + " ms")


if __name__ == "__main__":
    main()
