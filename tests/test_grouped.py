"""Grouped matmuls: each row group times its own matrix, in one kernel or one matmul per group, with empty groups."""

from __future__ import annotations

import pytest
import torch

from moeplex.model import grouped
from moeplex.model.experts import DenseExperts, group_tokens_by_expert
from moeplex.model.grouped import GroupedWeight, group_offsets, grouped_linear
from moeplex.model.ops import swiglu_mlp


def reference(x, matrices, sizes):
    return torch.cat([x[start : start + n] @ m.T for start, n, m in zip([0, *torch.tensor(sizes).cumsum(0).tolist()], sizes, matrices)])


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_matches_one_matmul_per_group(monkeypatch, kernel, dtype):
    monkeypatch.setattr(grouped, "grouped_matmul_available", lambda device: kernel)
    sizes = [3, 0, 1, 4, 0]
    x = torch.randn(sum(sizes), 16, dtype=dtype)
    stack = torch.randn(len(sizes), 24, 16, dtype=dtype)
    offsets = group_offsets(torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)), len(sizes))
    assert offsets.tolist() == [3, 3, 4, 8, 8]
    expected = reference(x, list(stack), sizes)
    for weight in (GroupedWeight(stack, offsets), GroupedWeight(list(stack), offsets), GroupedWeight(stack, offsets, offsets.tolist())):
        torch.testing.assert_close(grouped_linear(x, weight), expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("intermediate", [16, 10])  # 10: strides the grouped kernel refuses, so one matmul per expert
def test_grouped_experts_match_the_loop_over_experts(intermediate):
    experts, tokens, top_k = 6, 9, 2
    gate_up, down = torch.randn(experts, 2 * intermediate, 8), torch.randn(experts, 8, intermediate)
    hidden = torch.randn(tokens, 8)
    expert_ids = torch.stack([torch.randperm(4)[:top_k] + 2 for _ in range(tokens)])  # only experts 2..5: a span
    weights = torch.rand(tokens, top_k)
    expected = torch.zeros_like(hidden)
    for expert, rows, slots in group_tokens_by_expert(expert_ids):
        expected.index_add_(0, rows, swiglu_mlp(hidden[rows], gate_up[expert], down[expert]) * weights.flatten()[slots, None])
    torch.testing.assert_close(DenseExperts([gate_up], [down])(0, hidden, expert_ids, weights), expected)
