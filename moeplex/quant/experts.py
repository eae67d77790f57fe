"""QuantizedExperts: an expert door where every expert position has its own precision (bf16, int8, int4)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.model.experts import DenseExperts, group_tokens_by_expert
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, UNQUANTIZED, Position
from moeplex.quant.precision import LinearWeight, check_precision, quantize_matrix


@dataclass
class QuantizedExpert:
    """One SwiGLU expert whose two matrices share a precision."""

    precision: str
    gate_up: LinearWeight  # [2I, H]
    down: LinearWeight  # [H, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x W_gate) * (x W_up) W_down for x [n, H] -> [n, H]."""
        gate, up = self.gate_up.matmul(x).chunk(2, dim=-1)  # [n, I] each
        return self.down.matmul(F.silu(gate) * up)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


def quantize_expert(
    gate_up: torch.Tensor, down: torch.Tensor, precision: str, group_size: int = DEFAULT_GROUP_SIZE
) -> QuantizedExpert:
    return QuantizedExpert(precision, quantize_matrix(gate_up, precision, group_size), quantize_matrix(down, precision, group_size))


class QuantizedExperts:
    """ExpertCompute over per-layer lists of QuantizedExpert (None for dense layers)."""

    def __init__(self, experts: list[list[QuantizedExpert] | None]):
        self.experts = experts

    @classmethod
    def from_dense(
        cls, dense: DenseExperts, precision_of: Mapping[Position, str], group_size: int = DEFAULT_GROUP_SIZE
    ) -> QuantizedExperts:
        """Each position of `dense` in precision_of's precision (unlisted ones stay unquantized)."""
        positions = {
            (layer, expert) for layer, stack in enumerate(dense.gate_up) if stack is not None for expert in range(len(stack))
        }
        unknown = sorted(set(precision_of) - positions)
        if unknown:
            raise ValueError(f"no expert at positions {unknown[:5]} (layers without experts, or indices out of range)")
        layers: list[list[QuantizedExpert] | None] = []
        for layer, (gate_up, down) in enumerate(zip(dense.gate_up, dense.down)):
            if gate_up is None:
                layers.append(None)
                continue
            layers.append(
                [
                    quantize_expert(gate_up[e], down[e], check_precision(precision_of.get((layer, e), UNQUANTIZED)), group_size)
                    for e in range(len(gate_up))
                ]
            )
        return cls(layers)

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        out = torch.zeros_like(hidden)  # [T, H]
        flat_weights = routing_weights.flatten()  # [T*k]
        for expert, rows, slots in group_tokens_by_expert(expert_ids):
            y = self.experts[layer][expert](hidden[rows])  # [n, H]
            out.index_add_(0, rows, (y * flat_weights[slots, None]).to(out.dtype))
        return out

    @property
    def precisions(self) -> dict[Position, str]:
        return {
            (layer, e): expert.precision
            for layer, experts in enumerate(self.experts)
            if experts is not None
            for e, expert in enumerate(experts)
        }

    @property
    def nbytes(self) -> int:
        return sum(expert.nbytes for experts in self.experts if experts is not None for expert in experts)
