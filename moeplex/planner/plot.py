"""Plot measured configurations, their Pareto frontier and the chosen (or closest) point as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moeplex.planner.pareto import Measurement, pareto_frontier


QUALITY_LABELS = {"ppl": "perplexity (calibration text)", "kl": "KL from all bf16 (nats/token)"}


def plot_frontier(
    points: Sequence[Measurement], chosen: Measurement | None, path: Path, title: str, chosen_label: str = "chosen",
    quality: str = "ppl",
) -> Path:
    """Grey: every measured configuration; blue: the frontier over `quality` (ppl or kl; labelled int4/int8/bf16
    counts); red star: the chosen point, if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frontier = pareto_frontier(points, quality)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.scatter([p.tokens_per_s for p in points], [getattr(p, quality) for p in points], s=18, color="0.6",
                 label="measured configuration")
    axes.plot([p.tokens_per_s for p in frontier], [getattr(p, quality) for p in frontier], "o-", color="tab:blue",
              label="Pareto frontier")
    if chosen is not None:
        axes.scatter([chosen.tokens_per_s], [getattr(chosen, quality)], s=160, marker="*", color="tab:red", zorder=3,
                     label=chosen_label)
    for point in frontier:
        counts = point.config
        axes.annotate(f"{counts.int4}/{counts.int8}/{counts.bf16}", (point.tokens_per_s, getattr(point, quality)), fontsize=6,
                      textcoords="offset points", xytext=(3, 3))
    axes.ticklabel_format(axis="y", useOffset=False)
    axes.set_xlabel("decode tokens/s")
    axes.set_ylabel(QUALITY_LABELS[quality])
    axes.set_title(title + "\n(labels: experts in int4/int8/bf16)", fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
