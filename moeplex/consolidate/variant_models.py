"""Consolidated variants in memory: a plan's shared experts behind each variant's own backbone."""

from __future__ import annotations

import torch

from moeplex.store.materialize import materialize_expert
from moeplex.consolidate.plan import ConsolidationPlan
from moeplex.consolidate.similarity import FamilyExperts
from moeplex.model.experts import DenseExperts
from moeplex.model.runtime import MoEModel
from moeplex.model.weights import load_backbone


def consolidated_model(
    plan: ConsolidationPlan, variant: str, experts: FamilyExperts, dtype: torch.dtype = torch.bfloat16
) -> MoEModel:
    """Variant `variant` as it would be served from a store written with this plan."""
    checkpoint = experts.opened[variant]
    spec = checkpoint.spec
    backbone = load_backbone(checkpoint.family, checkpoint.reader, spec, dtype)
    gate_up: list[torch.Tensor | None] = [None] * spec.num_layers
    down: list[torch.Tensor | None] = [None] * spec.num_layers
    for layer in plan.sparse_layers:
        weights = [
            materialize_expert(plan.groups[plan.assignment[(variant, layer, e)]], experts.read)
            for e in range(spec.num_experts)
        ]
        gate_up[layer] = torch.stack([w["gate_up"] for w in weights]).to(dtype)
        down[layer] = torch.stack([w["down"] for w in weights]).to(dtype)
    return MoEModel(spec, backbone, DenseExperts(gate_up, down), dtype)
