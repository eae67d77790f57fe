"""`moeplex plan`: profile a store's configurations within a device budget, choose one, write its placement.

The device memory holds every backbone and as many experts as fit; a configuration whose experts do
not all fit is measured offloaded (the rest fetched from disk as the routers ask), unless resident_only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moeplex.consolidate.analysis import parse_budget
from moeplex.errors import MoeplexError
from moeplex.planner.cache import MeasurementCache
from moeplex.planner.choice import (
    ConstraintError,
    Constraints,
    choose_configuration,
    describe,
)
from moeplex.planner.configurations import all_unquantized, configuration_grid
from moeplex.planner.meter import MeterSettings, StoreMeter
from moeplex.planner.pareto import Measurement, pareto_frontier
from moeplex.planner.placement import Placement, placement_path, write_placement
from moeplex.planner.plot import plot_frontier
from moeplex.planner.profile import Profiler
from moeplex.quant.formats import UNQUANTIZED
from moeplex.quant.store_copies import write_quantized_copies


@dataclass
class PlanResult:
    budget_bytes: int
    reference: Measurement  # every expert bf16 (measured even when it does not fit)
    points: list[Measurement]  # the configurations measured within the budget
    chosen: Measurement
    placement_file: Path
    skipped: int  # configurations left out: their experts do not all fit and resident_only was asked for
    plot: Path | None = None
    frontier: list[Measurement] = field(default_factory=list)


def run_plan(
    store: Path,
    device_memory: str,
    constraints: Constraints,
    plot: Path | None = None,
    steps: int = 4,
    settings: MeterSettings | None = None,
    resident_only: bool = False,
) -> PlanResult:
    """Measure (or reuse) every configuration within `device_memory`, choose one, write it to the store.

    device_memory: bytes for experts + backbones ('800MB', '2GiB', or '0.5x' of all bf16 resident).
    resident_only: leave out configurations whose experts do not all fit instead of measuring them offloaded.
    Raises ConstraintError (after plotting the closest point) when the constraints cannot be met.
    """
    settings = settings or MeterSettings()
    meter = StoreMeter(store, settings)
    budget, expert_budget = device_budgets(meter, device_memory)
    profiler = Profiler(meter, MeasurementCache(store, meter.context()), None if resident_only else expert_budget)
    reference_config = all_unquantized(profiler.num_experts)
    grid = configuration_grid(profiler.num_experts, steps)
    fitting = [config for config in grid if not resident_only or profiler.expert_bytes(config) <= expert_budget]
    if not fitting:
        smallest = min(profiler.expert_bytes(config) for config in grid) + profiler.backbone_bytes
        raise MoeplexError(f"--device-memory {device_memory} ({budget} bytes) holds no configuration resident: the "
                           f"smallest (every expert int4, every backbone) needs {smallest} bytes")
    measured = profiler.measure(fitting if reference_config in fitting else [reference_config, *fitting])
    reference = next(m for m in measured if m.config == reference_config)
    points = [m for m in measured if m.config in fitting]
    title = f"{store.name}: {len(points)} configurations within {budget / 1e6:.1f} MB"
    try:
        chosen = choose_configuration(points, constraints, reference.ppl)
    except ConstraintError as error:
        if plot is not None:
            plot_frontier(points, error.closest, plot, title, chosen_label=f"closest (misses {', '.join(error.failing)})")
        raise
    placement = Placement(
        precision=profiler.precisions(chosen.config),
        group_size=settings.group_size,
        device_memory_bytes=budget,
        configuration=chosen.config.to_json(),
        measured={"tokens_per_s": chosen.tokens_per_s, "ppl": chosen.ppl, "reference_ppl": reference.ppl,
                  "resident_bytes": chosen.resident_bytes},
    )
    write_quantized_copies(store, placement.quantized(), settings.group_size)  # what the engine reads, resident or offloaded
    write_placement(store, placement)
    if plot is not None:
        plot_frontier(points, chosen, plot, title)
    return PlanResult(budget, reference, points, chosen, placement_path(store), len(grid) - len(fitting), plot,
                      pareto_frontier(points))


def device_budgets(meter: StoreMeter, device_memory: str) -> tuple[int, int]:
    """(device bytes, of which bytes for experts once every backbone is resident); MoeplexError when no expert fits."""
    bytes_per_expert = meter.bytes_per_expert()
    backbone_bytes = meter.backbone_bytes()
    budget = parse_budget(device_memory, backbone_bytes + len(meter.expert_ids) * bytes_per_expert[UNQUANTIZED])
    expert_budget = budget - backbone_bytes
    if expert_budget < bytes_per_expert[UNQUANTIZED]:
        raise MoeplexError(f"--device-memory {device_memory} ({budget} bytes) leaves {max(expert_budget, 0)} bytes for "
                           f"experts after the backbones ({backbone_bytes} bytes): less than one bf16 expert "
                           f"({bytes_per_expert[UNQUANTIZED]} bytes)")
    return budget, expert_budget


def format_plan(result: PlanResult) -> str:
    reference = result.reference.ppl
    lines = [
        f"device memory: {result.budget_bytes / 1e6:.1f} MB; {len(result.points)} configurations measured"
        + (f", {result.skipped} left out (not all resident)" if result.skipped else ""),
        f"{'int4':>5} {'int8':>5} {'bf16':>5} {'MB':>7} {'resident':>8} {'tok/s':>7} {'ppl':>8} {'vs bf16':>8} {'KL x1e-6':>9}  frontier",
    ]
    on_frontier = {id(p) for p in result.frontier}
    for point in sorted(result.points, key=lambda p: p.tokens_per_s):
        config = point.config
        mark = ("*" if id(point) in on_frontier else "") + (" <- chosen" if point is result.chosen else "")
        lines.append(f"{config.int4:>5} {config.int8:>5} {config.bf16:>5} {point.resident_bytes / 1e6:>7.1f}"
                     f" {point.resident_fraction:>8.0%} {point.tokens_per_s:>7.1f} {point.ppl:>8.3f} {point.ppl / reference - 1:>+8.2%} {point.kl * 1e6:>9.1f}  {mark}")
    lines.append(f"chosen: {describe(result.chosen, reference)}")
    lines.append(f"wrote {result.placement_file}" + (f" and {result.plot}" if result.plot else ""))
    return "\n".join(lines)
