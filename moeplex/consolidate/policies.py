"""Sharing policies: which expert positions share one stored expert, under a budget of stored experts.

Policies are pure: they take similarity/error oracles and return a ConsolidationPlan. The oracles are
`moeplex.consolidate.similarity.WeightDistances` and `OutputErrorModel` in real use, fakes in tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Protocol

from moeplex.consolidate.plan import ConsolidationPlan, ExpertSource

PLAN_METHODS = ("quality-aware", "l2-roundrobin")


class ErrorOracle(Protocol):
    def frequency(self, variant: str, layer: int, expert: int) -> float: ...

    def error(self, variant: str, layer: int, expert: int, source: ExpertSource) -> float: ...


class DistanceOracle(Protocol):
    def mean_pairwise_l2(self, layer: int, expert: int, among: tuple[str, ...]) -> float: ...


@dataclass(frozen=True)
class PlanShape:
    variants: tuple[str, ...]
    num_layers: int
    num_experts: int
    sparse_layers: tuple[int, ...]

    @property
    def positions_per_variant(self) -> int:
        return len(self.sparse_layers) * self.num_experts

    def clamp_budget(self, stored_experts: int) -> int:
        """Budgets run from every position shared (one copy each) to no sharing."""
        return max(self.positions_per_variant, min(stored_experts, self.positions_per_variant * len(self.variants)))

    def empty_plan(self, method: str) -> ConsolidationPlan:
        return ConsolidationPlan(method, self.variants, self.num_layers, self.num_experts, self.sparse_layers)


def l2_roundrobin_plan(shape: PlanShape, distances: DistanceOracle, stored_experts: int) -> ConsolidationPlan:
    """The published rule: share the positions whose experts are closest in L2, one copy taken round-robin."""
    budget = shape.clamp_budget(stored_experts)
    v = len(shape.variants)
    positions = [(l, e) for l in shape.sparse_layers for e in range(shape.num_experts)]
    ranked = sorted(positions, key=lambda p: distances.mean_pairwise_l2(p[0], p[1], shape.variants))
    unshared_total = len(positions) * v
    to_share = 0 if v == 1 else min(len(positions), -(-(unshared_total - budget) // (v - 1)))
    plan = shape.empty_plan("l2-roundrobin")
    for rank, (layer, expert) in enumerate(ranked):
        if rank < to_share:
            keeper = shape.variants[rank % v]
            _assign(plan, layer, expert, [(shape.variants, ExpertSource.copy_of((keeper, layer, expert)))])
        else:
            _assign(plan, layer, expert, [((n,), ExpertSource.copy_of((n, layer, expert))) for n in shape.variants])
    plan.validate()
    return plan


@dataclass
class _Grouping:
    """One way to serve a position: groups of variants, each with its source, and its weighted error."""

    groups: list[tuple[tuple[str, ...], ExpertSource]]
    cost: float


def quality_aware_plan(
    shape: PlanShape, oracle: ErrorOracle, stored_experts: int, base: str | None = None
) -> ConsolidationPlan:
    """Minimize routing-frequency-weighted output error over all variants under the budget.

    Per position, agglomerative merging of variants gives the best grouping for every number of copies
    (sources: a member's expert, the base's, or the frequency-weighted average of the members); a greedy
    allocation then spends the budget where an extra copy removes the most error per copy.
    """
    budget = shape.clamp_budget(stored_experts)
    positions = [(l, e) for l in shape.sparse_layers for e in range(shape.num_experts)]
    curves = {p: _grouping_curve(shape.variants, p, oracle, base) for p in positions}  # copies -> grouping
    copies = {p: 1 for p in positions}
    spare = budget - len(positions)
    while spare > 0:
        steps = [(step, p) for p in positions if (step := _best_step(curves[p], copies[p], spare)) is not None]
        if not steps:
            break
        (_, target), position = max(steps, key=lambda s: s[0][0])
        spare -= target - copies[position]
        copies[position] = target
    plan = shape.empty_plan("quality-aware")
    for (layer, expert), count in copies.items():
        _assign(plan, layer, expert, curves[(layer, expert)][count].groups)
    plan.validate()
    return plan


def _best_step(curve: dict[int, _Grouping], current: int, spare: int) -> tuple[float, int] | None:
    """(error removed per added copy, target copies) of the best affordable move, or None."""
    best = None
    for target in range(current + 1, min(max(curve), current + spare) + 1):
        gain = (curve[current].cost - curve[target].cost) / (target - current)
        if gain > 1e-12 and (best is None or gain > best[0]):
            best = (gain, target)
    return best


def _grouping_curve(variants, position, oracle: ErrorOracle, base: str | None) -> dict[int, _Grouping]:
    layer, expert = position
    clusters = [((v,), ExpertSource.copy_of((v, layer, expert)), 0.0) for v in variants]
    curve = {len(clusters): _Grouping([(c[0], c[1]) for c in clusters], 0.0)}
    while len(clusters) > 1:
        best = None
        for i, j in combinations(range(len(clusters)), 2):
            members = clusters[i][0] + clusters[j][0]
            source, cost = _best_source(members, layer, expert, oracle, base)
            increase = cost - clusters[i][2] - clusters[j][2]
            if best is None or increase < best[0]:
                best = (increase, i, j, (members, source, cost))
        _, i, j, merged = best
        clusters = [c for k, c in enumerate(clusters) if k not in (i, j)] + [merged]
        curve[len(clusters)] = _Grouping([(c[0], c[1]) for c in clusters], sum(c[2] for c in clusters))
    return curve


def _best_source(members, layer, expert, oracle: ErrorOracle, base: str | None):
    """The candidate source with the least frequency-weighted error for these members."""
    candidates = [ExpertSource.copy_of((m, layer, expert)) for m in members]
    if base is not None:
        candidates.append(ExpertSource.copy_of((base, layer, expert)))
    frequencies = [oracle.frequency(m, layer, expert) for m in members]
    total = sum(frequencies)
    weights = [f / total for f in frequencies] if total > 0 else [1 / len(members)] * len(members)
    candidates.append(ExpertSource(tuple((m, layer, expert) for m in members), tuple(weights)))
    scored = [
        (sum(f * oracle.error(m, layer, expert, c) for m, f in zip(members, frequencies)), c) for c in candidates
    ]
    cost, source = min(scored, key=lambda s: s[0])
    return source, cost


def _assign(plan: ConsolidationPlan, layer: int, expert: int, groups) -> None:
    for index, (members, source) in enumerate(groups):
        name = f"{layer}/{expert}/{index}"
        plan.groups[name] = source
        for variant in members:
            plan.assignment[(variant, layer, expert)] = name
