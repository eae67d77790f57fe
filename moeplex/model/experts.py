"""The narrow door to routed experts: hidden states + chosen expert ids in, weighted outputs out.

Everything that changes where experts live (tiers, sharing across variants) or in which precision
(int8/int4) implements `ExpertCompute`; the runtime never touches expert weights directly.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from moeplex.model import native_gemv
from moeplex.model.grouped import (
    GroupedWeight,
    group_offsets,
    grouped_linear,
    grouped_matmul_available,
    native_gemv_pays,
    runs_native_cpu_bf16,
)
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


def grouped_experts(
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, k], rows of the stacks
    routing_weights: torch.Tensor,  # [T, k]
    gate_up: torch.Tensor,  # [N, 2I, H]
    down: torch.Tensor,  # [N, H, I]
) -> torch.Tensor:
    """Weighted SwiGLU outputs [T, H] of every (token, choice), all experts in two grouped matmuls.

    Only the span of stack rows the step uses takes part, so a bank that stacks the experts of many
    layers (grouped by layer) costs no more than one layer's stack.
    """
    flat = expert_ids.flatten()  # [T*k]
    first, last = int(flat.min()), int(flat.max())
    order = torch.argsort(flat, stable=True)
    offsets = group_offsets(flat[order] - first, last - first + 1)
    rows = order // expert_ids.shape[1]  # token of each sorted (token, choice)
    gate, up = grouped_linear(hidden[rows], GroupedWeight(gate_up[first : last + 1], offsets)).chunk(2, dim=-1)  # [T*k, I] each
    y = grouped_linear(F.silu(gate) * up, GroupedWeight(down[first : last + 1], offsets))  # [T*k, H]
    out = torch.zeros_like(hidden)
    out.index_add_(0, rows, (y * routing_weights.flatten()[order, None]).to(out.dtype))
    return out


# Bytes of expert copies (one per token and choice) up to which gathering them beats a grouped matmul. Timed
# with 1 and 2 threads on the 2-core Xeon of docs/benchmarks.md (bf16, top-2, 1-8 tokens): the gathered GEMVs
# took about half the time for the tiny demo model's 192 KiB experts and still less for 768 KiB ones up to
# 2-4 copies, and more beyond: there each copy costs more than a matmul call saves. On a Zen 4 EPYC (no AMX)
# they also won: the tiny model's 4-variant decode step took 4.87 ms with them, 5.48 ms without.
MAX_GATHERED_BYTES = 3 * 2**20


def gathered_gemv_pays(hidden: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether `gathered_expert_gemv` is the faster way for these tokens: bf16 on a CPU that runs it natively, small copies."""
    copy_bytes = expert_ids.numel() * (gate_up.shape[1] * gate_up.shape[2] + down.shape[1] * down.shape[2]) * gate_up.element_size()
    return runs_native_cpu_bf16(hidden) and copy_bytes <= MAX_GATHERED_BYTES


def gathered_expert_gemv(
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, k], rows of the stacks
    routing_weights: torch.Tensor,  # [T, k]
    gate_up: torch.Tensor,  # [N, 2I, H]
    down: torch.Tensor,  # [N, H, I]
) -> torch.Tensor:
    """Weighted SwiGLU outputs [T, H] as two batched GEMVs, each (token, choice) times its own gathered expert.

    A decode step routes a few tokens over small experts; where each matmul call has a fixed cost (oneDNN's
    bf16), copying the chosen experts and running one weight-first batched GEMV per matrix beats a grouped
    matmul that calls once per expert (`gathered_gemv_pays`). No sorting is needed.
    """
    tokens, top_k = expert_ids.shape
    flat = expert_ids.flatten()  # [T*k]
    x = hidden.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # [T*k, H, 1]
    gate, up = torch.bmm(gate_up.index_select(0, flat), x).squeeze(-1).chunk(2, dim=-1)  # [T*k, I] each
    y = torch.bmm(down.index_select(0, flat), (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)  # [T*k, H]
    return _summed_choices(y, routing_weights, hidden.dtype)


def native_experts_pay(hidden: torch.Tensor, expert_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether `native_expert_gemv` is the faster way: few (token, choice) rows, and few on any one expert unless it is small."""
    rows = expert_ids.numel()
    if not (native_gemv.stack_fits(down) and native_gemv_pays(hidden, gate_up, rows=rows, rows_per_matrix=1)):
        return False
    sharing = int(torch.bincount(expert_ids.flatten()).max())
    return native_gemv_pays(hidden, gate_up, rows=rows, rows_per_matrix=sharing)


def native_expert_gemv(
    hidden: torch.Tensor,  # [T, H]
    expert_ids: torch.Tensor,  # [T, k], rows of the stacks
    routing_weights: torch.Tensor,  # [T, k]
    gate_up: torch.Tensor,  # [N, 2I, H]
    down: torch.Tensor,  # [N, H, I]
) -> torch.Tensor:
    """Weighted SwiGLU outputs [T, H] from the native gathered GEMV, each (token, choice) row times its expert in place.

    The rows are sorted by expert first, so the kernel reads an expert that several tokens chose once for
    up to four of them (`native_experts_pay`).
    """
    top_k = expert_ids.shape[1]
    ids, order = expert_ids.flatten().sort(stable=True)  # [T*k] each
    gate, up = native_gemv.gathered_gemv(hidden[order // top_k], gate_up, ids).chunk(2, dim=-1)  # [T*k, I] each, by expert
    by_expert = native_gemv.gathered_gemv(F.silu(gate) * up, down, ids)  # [T*k, H]
    y = torch.empty_like(by_expert).index_copy_(0, order, by_expert)  # back to (token, choice) order
    return _summed_choices(y, routing_weights, hidden.dtype)


def _summed_choices(y: torch.Tensor, routing_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T*k, H] outputs in (token, choice) order -> [T, H], each weighted by its routing weight."""
    tokens, top_k = routing_weights.shape
    weighted = (y * routing_weights.flatten()[:, None]).to(dtype)  # rounded as each term of the index_add_ path
    return weighted.view(tokens, top_k, -1).sum(1)


class DenseExperts:
    """All experts resident, as per-layer stacks gate_up [E, 2I, H] and down [E, H, I]."""

    def __init__(self, gate_up: list[torch.Tensor | None], down: list[torch.Tensor | None]):
        self.gate_up, self.down = gate_up, down

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        gate_up, down = self.gate_up[layer], self.down[layer]
        if native_experts_pay(hidden, expert_ids, gate_up, down):
            return native_expert_gemv(hidden, expert_ids, routing_weights, gate_up, down)
        if gathered_gemv_pays(hidden, expert_ids, gate_up, down):
            return gathered_expert_gemv(hidden, expert_ids, routing_weights, gate_up, down)
        if grouped_matmul_available(hidden.device):
            return grouped_experts(hidden, expert_ids, routing_weights, gate_up, down)
        out = torch.zeros_like(hidden)
        flat_weights = routing_weights.flatten()
        for expert, rows, slots in group_tokens_by_expert(expert_ids):
            y = swiglu_mlp(hidden[rows], gate_up[expert], down[expert])  # [n, H]
            out.index_add_(0, rows, (y * flat_weights[slots, None]).to(out.dtype))
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.gate_up, *self.down) if t is not None)
