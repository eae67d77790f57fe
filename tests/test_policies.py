"""Sharing policies under a budget, tested with synthetic experts (no model needed)."""

from __future__ import annotations

import pytest
import torch

from moeplex.consolidate.plan import ConsolidationPlan, ExpertSource
from moeplex.consolidate.policies import PlanShape, l2_roundrobin_plan, quality_aware_plan

VARIANTS = ("a", "b", "c", "d")
SHAPE = PlanShape(VARIANTS, num_layers=3, num_experts=5, sparse_layers=(0, 2))


class SyntheticExperts:
    """Each expert is a vector; a source's output is the weighted mean of its members' vectors."""

    def __init__(self, seed: int, base: str | None = None):
        g = torch.Generator().manual_seed(seed)
        names = VARIANTS + ((base,) if base else ())
        self.vectors = {}
        for layer in SHAPE.sparse_layers:
            for expert in range(SHAPE.num_experts):
                center = torch.randn(8, generator=g)
                spread = float(torch.rand((), generator=g)) * 2  # some positions nearly identical, some not
                for name in names:
                    self.vectors[(name, layer, expert)] = center + spread * torch.randn(8, generator=g)
                if expert == 0:  # byte-identical across variants
                    for name in names:
                        self.vectors[(name, layer, expert)] = center
        self.freq = {k: float(torch.rand((), generator=g)) + 0.05 for k in self.vectors}

    def frequency(self, variant, layer, expert):
        return self.freq[(variant, layer, expert)]

    def output(self, source: ExpertSource) -> torch.Tensor:
        return sum(w * self.vectors[m] for m, w in zip(source.members, source.weights))

    def error(self, variant, layer, expert, source):
        own = self.vectors[(variant, layer, expert)]
        return float((own - self.output(source)).norm() / own.norm())

    def mean_pairwise_l2(self, layer, expert, among):
        vs = [self.vectors[(n, layer, expert)] for n in among]
        pairs = [(i, j) for i in range(len(vs)) for j in range(len(vs)) if i != j]
        return sum(float((vs[i] - vs[j]).norm()) for i, j in pairs) / len(pairs)


def weighted_error(plan: ConsolidationPlan, experts: SyntheticExperts) -> float:
    return sum(
        experts.frequency(*p) * experts.error(*p, plan.groups[g]) for p, g in plan.assignment.items()
    )


BUDGETS = list(range(SHAPE.positions_per_variant, SHAPE.positions_per_variant * len(VARIANTS) + 1, 5))


@pytest.mark.parametrize("budget", BUDGETS)
def test_plans_respect_the_budget_and_cover_every_position(budget):
    experts = SyntheticExperts(seed=budget)
    for plan in (l2_roundrobin_plan(SHAPE, experts, budget), quality_aware_plan(SHAPE, experts, budget)):
        plan.validate()
        assert plan.num_stored_experts <= budget
        assert len(plan.assignment) == SHAPE.positions_per_variant * len(VARIANTS)


def test_smallest_budget_shares_every_position_and_largest_loses_nothing():
    experts = SyntheticExperts(seed=3)
    smallest = quality_aware_plan(SHAPE, experts, 0)
    assert smallest.num_stored_experts == SHAPE.positions_per_variant
    largest = quality_aware_plan(SHAPE, experts, 10**6)
    assert weighted_error(largest, experts) == pytest.approx(0.0, abs=1e-9)


def test_identical_experts_are_shared_for_free():
    experts = SyntheticExperts(seed=11)
    plan = quality_aware_plan(SHAPE, experts, 10**6)
    for layer in SHAPE.sparse_layers:
        groups = {plan.assignment[(v, layer, 0)] for v in VARIANTS}
        assert len(groups) == 1, "expert 0 is identical in every variant and needs one copy"


def test_quality_aware_error_falls_with_budget_and_beats_l2_roundrobin():
    for seed in range(4):
        experts = SyntheticExperts(seed=100 + seed, base="base")
        previous = float("inf")
        for budget in BUDGETS:
            ours = weighted_error(quality_aware_plan(SHAPE, experts, budget, base="base"), experts)
            published = weighted_error(l2_roundrobin_plan(SHAPE, experts, budget), experts)
            assert ours <= previous + 1e-9
            assert ours <= published + 1e-9
            previous = ours


def test_l2_roundrobin_shares_the_closest_positions_round_robin():
    experts = SyntheticExperts(seed=5)
    budget = SHAPE.positions_per_variant * len(VARIANTS) - 3 * (len(VARIANTS) - 1)  # room to share 3 positions
    plan = l2_roundrobin_plan(SHAPE, experts, budget)
    positions = [(l, e) for l in SHAPE.sparse_layers for e in range(SHAPE.num_experts)]
    ranked = sorted(positions, key=lambda p: experts.mean_pairwise_l2(*p, VARIANTS))
    for rank, (layer, expert) in enumerate(ranked):
        groups = {plan.assignment[(v, layer, expert)] for v in VARIANTS}
        assert len(groups) == (1 if rank < 3 else len(VARIANTS))
        if rank < 3:
            assert plan.groups[groups.pop()].members == ((VARIANTS[rank % 4], layer, expert),)


def test_plan_json_round_trip():
    plan = quality_aware_plan(SHAPE, SyntheticExperts(seed=9), 25)
    again = ConsolidationPlan.from_json(plan.to_json())
    assert again.assignment == plan.assignment and again.groups == plan.groups
