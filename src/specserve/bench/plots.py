"""PNG plots of the benchmark report (matplotlib, an optional extra: `pip install 'specserve[bench]'`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specserve.bench.records import PLAIN

if TYPE_CHECKING:
    from specserve.bench.report import HarnessData


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def speedup_per_category(data: HarnessData, path: Path) -> Path:
    """Grouped bars: speedup over our plain decoding, per category, one bar per method."""
    from specserve.bench.report import speedup

    plt = _pyplot()
    methods = [m for m in data.methods if m != PLAIN and data.of(m)]
    cats = data.categories
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cats) + 2), 4.2))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        values = [speedup(data.in_category(c), m, PLAIN) for c in cats]
        ax.bar([x + i * width for x in range(len(cats))], values, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("speedup over our plain decoding")
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def acceptance_length_distribution(data: HarnessData, path: Path) -> Path:
    """Box plot of per-request acceptance length (new tokens / target forwards) per method."""
    plt = _pyplot()
    methods = [m for m in data.methods if data.of(m)]
    values = [[r.new_tokens / r.forward_passes for r in data.of(m) if r.forward_passes] for m in methods]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(methods) + 2), 4.2))
    ax.boxplot(values, tick_labels=methods)
    ax.tick_params(axis="x", rotation=30)
    ax.set_ylabel("acceptance length per request")
    return _save(fig, path)


def throughput_vs_concurrency(rates: dict[str, dict[int, float]], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, levels in rates.items():
        ax.plot(list(levels), list(levels.values()), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens/s")
    ax.legend(fontsize="small")
    return _save(fig, path)


def draw_all(data: HarnessData, throughput: dict[str, dict[int, float]], img_dir: Path) -> dict[str, Path]:
    """Every plot there is data for: {name: path}."""
    images = {
        "speedup per category": speedup_per_category(data, img_dir / "speedup_per_category.png"),
        "acceptance length distribution": acceptance_length_distribution(data, img_dir / "acceptance_length.png"),
    }
    if throughput:
        images["throughput"] = throughput_vs_concurrency(throughput, img_dir / "throughput_vs_concurrency.png")
    return images
