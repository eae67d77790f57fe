"""A consolidation plan: which expert positions of which variants share one stored expert, and its source.

Plans are produced by planning policies (`l2-roundrobin`, `quality-aware`) and consumed by the store
writer. They are plain data: JSON-serializable via `to_json` / `from_json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# An expert position of one variant: (variant name, layer, expert index).
Position = tuple[str, int, int]


@dataclass(frozen=True)
class ExpertSource:
    """How a stored expert's weights are made from the variants' experts.

    members: positions whose experts are combined; weights: their coefficients (summing to 1).
    One member with weight 1.0 is a plain copy.
    """

    members: tuple[Position, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if not self.members or len(self.members) != len(self.weights):
            raise ValueError("an ExpertSource needs one weight per member and at least one member")
        if abs(sum(self.weights) - 1.0) > 1e-6:
            raise ValueError(f"ExpertSource weights must sum to 1, got {sum(self.weights)}")

    @staticmethod
    def copy_of(position: Position) -> "ExpertSource":
        return ExpertSource((position,), (1.0,))


@dataclass
class ConsolidationPlan:
    """groups: group name -> source; assignment: every position of every variant -> group name."""

    method: str
    variants: tuple[str, ...]
    num_layers: int
    num_experts: int
    sparse_layers: tuple[int, ...]  # indices of the layers that have routed experts
    groups: dict[str, ExpertSource] = field(default_factory=dict)
    assignment: dict[Position, str] = field(default_factory=dict)
    budget_bytes: int | None = None

    def positions(self):
        for variant in self.variants:
            for layer in self.sparse_layers:
                for expert in range(self.num_experts):
                    yield (variant, layer, expert)

    def validate(self) -> None:
        missing = [p for p in self.positions() if p not in self.assignment]
        if missing:
            raise ValueError(f"plan '{self.method}' leaves {len(missing)} positions unassigned, e.g. {missing[0]}")
        unknown = {g for g in self.assignment.values() if g not in self.groups}
        if unknown:
            raise ValueError(f"plan '{self.method}' assigns to unknown groups {sorted(unknown)[:3]}")

    @property
    def num_stored_experts(self) -> int:
        return len(set(self.assignment.values()))

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "variants": list(self.variants),
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "sparse_layers": list(self.sparse_layers),
            "budget_bytes": self.budget_bytes,
            "groups": {
                name: {"members": [list(m) for m in src.members], "weights": list(src.weights)}
                for name, src in self.groups.items()
            },
            "assignment": [[v, l, e, g] for (v, l, e), g in self.assignment.items()],
        }

    @staticmethod
    def from_json(data: dict) -> "ConsolidationPlan":
        groups = {
            name: ExpertSource(tuple(tuple(m) for m in g["members"]), tuple(g["weights"]))
            for name, g in data["groups"].items()
        }
        return ConsolidationPlan(
            method=data["method"],
            variants=tuple(data["variants"]),
            num_layers=data["num_layers"],
            num_experts=data["num_experts"],
            sparse_layers=tuple(data["sparse_layers"]),
            groups=groups,
            assignment={(v, l, e): g for v, l, e, g in data["assignment"]},
            budget_bytes=data.get("budget_bytes"),
        )


def identity_plan(variants: tuple[str, ...], num_layers: int, num_experts: int, sparse_layers: tuple[int, ...]) -> ConsolidationPlan:
    """No sharing: every position keeps its own expert (byte-identical ones are still stored once)."""
    plan = ConsolidationPlan("none", variants, num_layers, num_experts, sparse_layers)
    for position in plan.positions():
        name = "{}/{}/{}".format(*position)
        plan.groups[name] = ExpertSource.copy_of(position)
        plan.assignment[position] = name
    return plan
