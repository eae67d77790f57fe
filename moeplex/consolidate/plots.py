"""PNG plots of consolidation: expert similarity heatmaps and quality against budget."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from moeplex.consolidate.analysis import FamilyAnalysis  # noqa: E402
from moeplex.consolidate.plan import ExpertSource  # noqa: E402


def similarity_heatmaps(analysis: FamilyAnalysis, out_dir: Path) -> list[Path]:
    """Per variant pair: layer x expert maps of weight L2 distance and output error. Returns the PNG paths."""
    shape, paths = analysis.shape, []
    for a, b in combinations(analysis.variants, 2):
        l2 = torch.zeros(len(shape.sparse_layers), shape.num_experts)
        output = torch.zeros_like(l2)
        i, j = analysis.distances.names.index(a), analysis.distances.names.index(b)
        for row, layer in enumerate(shape.sparse_layers):
            for expert in range(shape.num_experts):
                l2[row, expert] = analysis.distances.l2[(layer, expert)][i, j]
                output[row, expert] = analysis.errors.error(a, layer, expert, ExpertSource.copy_of((b, layer, expert)))
        fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(shape.sparse_layers) + 2.5))
        for axis, values, title in ((axes[0], l2, "weight L2 distance"), (axes[1], output, f"output error of {b} on {a}'s inputs")):
            image = axis.imshow(values.numpy(), aspect="auto", cmap="viridis")
            axis.set(title=title, xlabel="expert", ylabel="layer", yticks=range(len(shape.sparse_layers)))
            axis.set_yticklabels(shape.sparse_layers)
            fig.colorbar(image, ax=axis)
        fig.suptitle(f"{a} vs {b}")
        fig.tight_layout()
        path = out_dir / f"similarity_{a}_vs_{b}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def quality_vs_budget(sweep: dict, out_path: Path) -> Path:
    """Mean own-domain perplexity increase against store size, per method, baselines as markers."""
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for method, values in sweep["mean_ppl_increase"].items():
        axis.plot(sweep["budget_multiples"], [100 * v for v in values], marker="o", label=method)
    for name, value in sweep["baselines_mean_ppl_increase"].items():
        axis.scatter([1.0], [100 * value], marker="x", s=60, label=f"{name} (merged, 1 model)")
    axis.set(xlabel="store size (multiples of one model)", ylabel="mean own-domain perplexity increase (%)")
    axis.set_title("Consolidation quality against budget")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
