"""`moeplex bench quant` on a trained store: which selection policy keeps held-out perplexity lowest, and the frontier.

Both use the planner's measurement code (StoreMeter, Profiler): errors and routing frequencies come from
calibration text (training split); perplexity is on held-out text no model was trained on.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from moeplex.planner.configurations import Configuration, configuration_grid
from moeplex.planner.pareto import Measurement, pareto_frontier
from moeplex.planner.plot import plot_frontier
from moeplex.planner.profile import Profiler
from moeplex.quant.policies import LeastErrorFirst, LeastRoutedFirst, RandomSelection

INT4_FRACTIONS = (0.125, 0.25, 0.5, 0.75)  # 0 and 1 leave nothing to choose: every policy gives the same model
# Random is a distribution over choices, scored by its mean. On the tiny family single draws spread by
# several hundredths of perplexity, more than the policies differ; three draws left the mean within noise
# of least-error-first, so eight are drawn and the mean's standard error is reported (docs/benchmarks.md).
RANDOM_SEEDS = tuple(range(8))


def compare_selections(profiler: Profiler, heldout: Mapping[str, torch.Tensor], int4_fractions=INT4_FRACTIONS, seeds=RANDOM_SEEDS) -> dict:
    """Held-out perplexity and KL from all bf16 (means over variants) at each memory point for each policy.

    Random is averaged over seeds. result[policy] holds perplexities, result["kl"][policy] the KLs.
    """
    meter, calibration, n = profiler.meter, profiler.calibration, profiler.num_experts
    policies = {
        LeastRoutedFirst.name: LeastRoutedFirst(calibration.frequency),
        LeastErrorFirst.name: LeastErrorFirst(calibration.errors, calibration.frequency),
    }
    bf16_expert_bytes = profiler.expert_bytes(Configuration(0, 0, n))
    meter.use({})
    result = {
        "bf16_ppl": meter.quality(heldout)[0],
        "heldout_tokens": {variant: ids.numel() for variant, ids in heldout.items()},
        "int4_fraction": list(int4_fractions),
        "memory_points": [],  # expert bytes as a fraction of all-bf16 expert bytes
        "random_seeds": list(seeds),
        "random_per_seed": [],
        "random_sem": [],  # standard error of the random mean over seeds
        RandomSelection.name: [],
        **{name: [] for name in policies},
        "kl": {name: [] for name in (RandomSelection.name, *policies)},
    }

    scored = tqdm(total=len(int4_fractions) * (len(seeds) + len(policies)), desc="selections scored", unit="model")

    def heldout_quality(policy, config: Configuration) -> tuple[float, float]:
        meter.use(policy.choose(meter.expert_ids, config.quantized_counts))
        quality = meter.quality(heldout)
        scored.update()
        return quality

    for fraction in int4_fractions:
        int4 = round(n * fraction)
        config = Configuration(int4, 0, n - int4)
        result["memory_points"].append(profiler.expert_bytes(config) / bf16_expert_bytes)
        per_seed = [heldout_quality(RandomSelection(seed), config) for seed in seeds]
        random_ppls = [ppl for ppl, _ in per_seed]
        result["random_per_seed"].append(random_ppls)
        result["random_sem"].append(_standard_error(random_ppls))
        result[RandomSelection.name].append(statistics.mean(random_ppls))
        result["kl"][RandomSelection.name].append(statistics.mean(kl for _, kl in per_seed))
        for name, policy in policies.items():
            ppl, kl = heldout_quality(policy, config)
            result[name].append(ppl)
            result["kl"][name].append(kl)
    scored.close()
    meter.use({})
    return result


def measure_frontier(profiler: Profiler, steps: int) -> dict:
    """Every configuration of the grid measured at the profiler's expert budget; the frontier and its tokens/s span."""
    points = profiler.measure(configuration_grid(profiler.num_experts, steps))
    frontier, frontier_kl = pareto_frontier(points, "ppl"), pareto_frontier(points, "kl")
    return {
        "frontier": [p.to_json() for p in frontier],  # over held-out perplexity
        "frontier_kl": [p.to_json() for p in frontier_kl],  # over KL from the all-bf16 model
        "points": [p.to_json() for p in points],
        "frontier_tokens_per_s_span": _span(frontier),
        "frontier_kl_tokens_per_s_span": _span(frontier_kl),
        "all_points_tokens_per_s_span": _span(points),
    }


def plot_frontier_result(frontier: dict, path: Path, title: str) -> Path:
    """The frontier part's result (`measure_frontier`, or its JSON) as a PNG: every configuration and the frontier
    over KL from all bf16, the quality both demo families rank by (the bench family is untrained)."""
    points = [Measurement.from_json(point) for point in frontier["points"]]
    span = frontier["frontier_kl_tokens_per_s_span"]
    return plot_frontier(points, None, path, f"{title}: frontier over KL, {len(frontier['frontier_kl'])} points, {span:.2f}x", quality="kl")


def _standard_error(values: list[float]) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")


def _span(points) -> float:
    speeds = [p.tokens_per_s for p in points]
    return max(speeds) / min(speeds)


def format_selection(selection: dict) -> str:
    lines = [
        (
            f"held-out ppl and KL from all bf16 (x1e-6 nats/token; means over variants; all bf16 ppl: {selection['bf16_ppl']:.4f}); "
            f"random: mean of seeds {selection['random_seeds']} (sem: its standard error)"
        ),
        f"{'int4':>6} {'expert bytes':>13} {'random':>10} {'sem':>7} {'least-routed':>13} {'least-error':>12}"
        f" {'KL random':>10} {'least-routed':>13} {'least-error':>12}",
    ]
    kl = selection["kl"]
    sem = selection.get("random_sem", [float("nan")] * len(selection["int4_fraction"]))  # absent in older JSON
    for i, fraction in enumerate(selection["int4_fraction"]):
        lines.append(f"{fraction:>6.1%} {selection['memory_points'][i]:>13.1%} {selection['random'][i]:>10.4f}"
                     f" {sem[i]:>7.4f} {selection['least-routed-first'][i]:>13.4f} {selection['least-error-first'][i]:>12.4f}"
                     f" {kl['random'][i] * 1e6:>10.1f} {kl['least-routed-first'][i] * 1e6:>13.1f} {kl['least-error-first'][i] * 1e6:>12.1f}")
    return "\n".join(lines)


def format_frontier(frontier: dict) -> str:
    lines = []
    for key, quality in (("frontier", "held-out perplexity"), ("frontier_kl", "KL from all bf16")):
        points = frontier[key]
        lines += [
            f"frontier over {quality}: {len(points)} of {len(frontier['points'])} configurations, tokens/s span "
            f"{frontier[key + '_tokens_per_s_span']:.2f}x (all points {frontier['all_points_tokens_per_s_span']:.2f}x)",
            f"{'int4':>5} {'int8':>5} {'bf16':>5} {'resident':>8} {'tok/s':>7} {'ppl':>9} {'KL x1e-6':>9}",
        ]
        for point in points:
            c = point["config"]
            lines.append(f"{c['int4']:>5} {c['int8']:>5} {c['bf16']:>5} {point['resident_fraction']:>8.0%}"
                         f" {point['tokens_per_s']:>7.1f} {point['ppl']:>9.4f} {point['kl'] * 1e6:>9.1f}")
    return "\n".join(lines)
