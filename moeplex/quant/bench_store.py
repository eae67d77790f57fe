"""`moeplex bench quant` on a trained store: which selection policy keeps held-out perplexity lowest, and the frontier.

Both use the planner's measurement code (StoreMeter, Profiler): errors and routing frequencies come from
calibration text (training split); perplexity is on held-out text no model was trained on.
"""

from __future__ import annotations

import statistics

import torch

from moeplex.planner.configurations import Configuration, configuration_grid
from moeplex.planner.pareto import pareto_frontier
from moeplex.planner.profile import Profiler
from moeplex.quant.policies import LeastErrorFirst, LeastRoutedFirst, RandomSelection

INT4_FRACTIONS = (0.125, 0.25, 0.5, 0.75)  # 0 and 1 leave nothing to choose: every policy gives the same model
RANDOM_SEEDS = (0, 1, 2)


def compare_selections(profiler: Profiler, heldout: torch.Tensor, int4_fractions=INT4_FRACTIONS, seeds=RANDOM_SEEDS) -> dict:
    """Held-out perplexity (mean over variants) at each memory point for each policy; random averaged over seeds."""
    meter, calibration, n = profiler.meter, profiler.calibration, profiler.num_experts
    policies = {
        LeastRoutedFirst.name: LeastRoutedFirst(calibration.frequency),
        LeastErrorFirst.name: LeastErrorFirst(calibration.errors, calibration.frequency),
    }
    bf16_expert_bytes = profiler.expert_bytes(Configuration(0, 0, n))
    meter.use({})
    result = {
        "bf16_ppl": meter.perplexity(heldout),
        "heldout_tokens": heldout.numel(),
        "int4_fraction": list(int4_fractions),
        "memory_points": [],  # expert bytes as a fraction of all-bf16 expert bytes
        "random_seeds": list(seeds),
        "random_per_seed": [],
        RandomSelection.name: [],
        **{name: [] for name in policies},
    }

    def heldout_ppl(policy, config: Configuration) -> float:
        meter.use(policy.choose(meter.expert_ids, config.quantized_counts))
        return meter.perplexity(heldout)

    for fraction in int4_fractions:
        int4 = round(n * fraction)
        config = Configuration(int4, 0, n - int4)
        result["memory_points"].append(profiler.expert_bytes(config) / bf16_expert_bytes)
        per_seed = [heldout_ppl(RandomSelection(seed), config) for seed in seeds]
        result["random_per_seed"].append(per_seed)
        result[RandomSelection.name].append(statistics.mean(per_seed))
        for name, policy in policies.items():
            result[name].append(heldout_ppl(policy, config))
    meter.use({})
    return result


def measure_frontier(profiler: Profiler, steps: int) -> dict:
    """Every configuration of the grid measured at the profiler's expert budget; the frontier and its tokens/s span."""
    points = profiler.measure(configuration_grid(profiler.num_experts, steps))
    frontier = pareto_frontier(points)
    speeds = [p.tokens_per_s for p in frontier]
    return {
        "frontier": [p.to_json() for p in frontier],
        "points": [p.to_json() for p in points],
        "frontier_tokens_per_s_span": max(speeds) / min(speeds),
        "all_points_tokens_per_s_span": max(p.tokens_per_s for p in points) / min(p.tokens_per_s for p in points),
    }


def format_selection(selection: dict) -> str:
    lines = [
        (
            f"held-out ppl (mean over variants; all bf16: {selection['bf16_ppl']:.4f}); "
            f"random: mean of seeds {selection['random_seeds']}"
        ),
        f"{'int4':>6} {'expert bytes':>13} {'random':>10} {'least-routed':>13} {'least-error':>12}",
    ]
    for i, fraction in enumerate(selection["int4_fraction"]):
        lines.append(f"{fraction:>6.1%} {selection['memory_points'][i]:>13.1%} {selection['random'][i]:>10.4f}"
                     f" {selection['least-routed-first'][i]:>13.4f} {selection['least-error-first'][i]:>12.4f}")
    return "\n".join(lines)


def format_frontier(frontier: dict) -> str:
    lines = [
        (
            f"frontier: {len(frontier['frontier'])} of {len(frontier['points'])} configurations, tokens/s span "
            f"{frontier['frontier_tokens_per_s_span']:.2f}x (all points {frontier['all_points_tokens_per_s_span']:.2f}x)"
        ),
        f"{'int4':>5} {'int8':>5} {'bf16':>5} {'resident':>8} {'tok/s':>7} {'ppl':>9}",
    ]
    for point in frontier["frontier"]:
        c = point["config"]
        lines.append(f"{c['int4']:>5} {c['int8']:>5} {c['bf16']:>5} {point['resident_fraction']:>8.0%}"
                     f" {point['tokens_per_s']:>7.1f} {point['ppl']:>9.4f}")
    return "\n".join(lines)
