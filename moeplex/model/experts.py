"""The narrow door to routed experts: hidden states + chosen expert ids in, weighted outputs out.

Everything that changes where experts live (tiers, sharing across variants) or in which precision
(int8/int4) implements `ExpertCompute`; the runtime never touches expert weights directly.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moeplex.model.ops import swiglu_mlp


class ExpertCompute(Protocol):
    def __call__(
        self,
        layer: int,
        hidden: torch.Tensor,  # [T, H]
        expert_ids: torch.Tensor,  # [T, k] int64, indices into this layer's experts
        routing_weights: torch.Tensor,  # [T, k] float32
    ) -> torch.Tensor:  # [T, H]
        ...


def group_tokens_by_expert(expert_ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """[(expert, token rows, flat (token, slot) indices)] for every expert the step routes to.

    Each expert then runs once on all of its tokens.
    """
    top_k = expert_ids.shape[1]
    flat = expert_ids.flatten()  # [T*k]
    if flat.numel() == top_k:  # one token: no sort needed
        device = expert_ids.device
        return [
            (int(e), torch.zeros(1, dtype=torch.long, device=device), torch.tensor([slot], device=device))
            for slot, e in enumerate(flat.tolist())
        ]
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    groups = []
    for expert, indices in zip(experts.tolist(), torch.split(order, counts.tolist())):
        groups.append((expert, indices // top_k, indices))
    return groups


class DenseExperts:
    """All experts resident, as per-layer stacks gate_up [E, 2I, H] and down [E, H, I]."""

    def __init__(self, gate_up: list[torch.Tensor | None], down: list[torch.Tensor | None]):
        self.gate_up, self.down = gate_up, down

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        out = torch.zeros_like(hidden)
        flat_weights = routing_weights.flatten()
        for expert, rows, slots in group_tokens_by_expert(expert_ids):
            y = swiglu_mlp(hidden[rows], self.gate_up[layer][expert], self.down[layer][expert])  # [n, H]
            out.index_add_(0, rows, (y * flat_weights[slots, None]).to(out.dtype))
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.gate_up, *self.down) if t is not None)
