"""QuantizedExperts: an expert door where every expert position has its own precision (bf16, int8, int4)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.model.experts import DenseExperts, group_tokens_by_expert
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, UNQUANTIZED, Position
from moeplex.quant.int4 import native_swiglu, native_swiglu_mixture
from moeplex.quant.precision import LinearWeight, check_precision, quantize_matrix


@dataclass
class QuantizedExpert:
    """One SwiGLU expert whose two matrices share a precision."""

    precision: str
    gate_up: LinearWeight  # [2I, H]
    down: LinearWeight  # [H, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """silu(x W_gate) * (x W_up) W_down for x [n, H] -> [n, H]."""
        if self.precision == "int4" and (fused := native_swiglu(x, self.gate_up, self.down)) is not None:
            return fused
        gate, up = self.gate_up.matmul(x).chunk(2, dim=-1)  # [n, I] each
        return self.down.matmul(F.silu(gate) * up)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    @property
    def device(self) -> torch.device:
        return _tensors(self.gate_up)[0].device

    def to(self, device) -> QuantizedExpert:
        """The expert on `device`; int4 is packed for one kind of device, so it cannot move between CPU and CUDA."""
        device = torch.device(device)
        if self.precision == "int4" and device.type != self.device.type:
            raise ValueError(f"an int4 expert packed for {self.device.type} cannot move to {device.type}: "
                             "read it onto that device from the store's copy (moeplex.quant.store_copies)")
        return self._map(lambda t: t.to(device))

    def pin_memory(self) -> QuantizedExpert:
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedExpert:
        return QuantizedExpert(self.precision, _map_tensors(self.gate_up, fn), _map_tensors(self.down, fn))


def _tensors(weight: LinearWeight) -> list[torch.Tensor]:
    return [value for field in dataclasses.fields(weight) if isinstance(value := getattr(weight, field.name), torch.Tensor)]


def _map_tensors(weight: LinearWeight, fn: Callable[[torch.Tensor], torch.Tensor]) -> LinearWeight:
    """The same weight with fn applied to each of its tensors (its other fields kept)."""
    changed = {f.name: fn(v) for f in dataclasses.fields(weight) if isinstance(v := getattr(weight, f.name), torch.Tensor)}
    return dataclasses.replace(weight, **changed)


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
        cls,
        dense: DenseExperts,
        precision_of: Mapping[Position, str],
        group_size: int = DEFAULT_GROUP_SIZE,
        quantized: Mapping[Position, QuantizedExpert] | None = None,
    ) -> QuantizedExperts:
        """Each position of `dense` in precision_of's precision (unlisted ones stay unquantized).

        Positions in `quantized` take that expert as given (already quantized, e.g. read from the store's
        copies; its precision must be precision_of's) instead of quantizing the dense one.
        """
        quantized = quantized or {}
        positions = {
            (layer, expert) for layer, stack in enumerate(dense.gate_up) if stack is not None for expert in range(len(stack))
        }
        unknown = sorted((set(precision_of) | set(quantized)) - positions)
        if unknown:
            raise ValueError(f"no expert at positions {unknown[:5]} (layers without experts, or indices out of range)")
        mismatched = sorted(p for p, expert in quantized.items() if precision_of.get(p, UNQUANTIZED) != expert.precision)
        if mismatched:
            raise ValueError(f"given quantized experts at positions {mismatched[:5]} are not in the precision asked for")

        def expert_at(layer: int, e: int) -> QuantizedExpert:
            if (layer, e) in quantized:
                return quantized[(layer, e)]
            precision = check_precision(precision_of.get((layer, e), UNQUANTIZED))
            return quantize_expert(dense.gate_up[layer][e], dense.down[layer][e], precision, group_size)

        return cls(
            [
                None if stack is None else [expert_at(layer, e) for e in range(len(stack))]
                for layer, stack in enumerate(dense.gate_up)
            ]
        )

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        if hidden.shape[0] == 1:  # a decode step at batch 1: the same sums in fewer torch calls
            return self.one_token(layer, hidden, expert_ids, routing_weights)
        return self.grouped(layer, hidden, expert_ids, routing_weights)

    def grouped(self, layer, hidden, expert_ids, routing_weights):
        """Each routed expert once on all of its tokens hidden [T, H]; outputs weighted and summed per token."""
        out = torch.zeros_like(hidden)  # [T, H]
        flat_weights = routing_weights.flatten()  # [T*k]
        for expert, rows, slots in group_tokens_by_expert(expert_ids):
            y = self.experts[layer][expert](hidden[rows])  # [n, H]
            out.index_add_(0, rows, (y * flat_weights[slots, None]).to(out.dtype))
        return out

    def one_token(self, layer, hidden, expert_ids, routing_weights):
        """`grouped` for one token hidden [1, H], with the same roundings: each output times its weight, then summed in turn
        (in one native call when every chosen expert is int4 on the native kernel: `native_swiglu_mixture`)."""
        chosen = [self.experts[layer][expert] for expert in expert_ids[0].tolist()]
        weights = routing_weights[0].tolist()
        if all(expert.precision == "int4" for expert in chosen):  # all int4: one native call where it runs
            mixture = native_swiglu_mixture(hidden, [(expert.gate_up, expert.down) for expert in chosen], weights)
            if mixture is not None:
                return mixture
        out = None
        for expert, weight in zip(chosen, weights):
            y = expert(hidden).mul_(weight)
            out = y if out is None else out.add_(y)
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
