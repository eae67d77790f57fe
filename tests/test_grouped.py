"""Grouped matmuls: each row group times its own matrix, in one kernel or one matmul per group, with empty groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeplex.model import experts as experts_module
from moeplex.model import grouped, ops
from moeplex.model.experts import DenseExperts, group_tokens_by_expert
from moeplex.model.grouped import GroupedWeight, PaddedRows, group_offsets, grouped_linear
from moeplex.model.ops import swiglu_mlp

padded_linear = grouped.padded_linear


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


@pytest.mark.parametrize("sizes", [[0, 2, 2, 0], [3, 0, 1, 4, 0], [1, 1, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_matches_one_matmul_per_group(monkeypatch, sizes, dtype):
    calls = []
    monkeypatch.setattr(grouped, "padded_linear", lambda *args: calls.append(1) or padded_linear(*args))
    offsets = torch.tensor(sizes).cumsum(0).tolist()
    padded = PaddedRows.of(offsets, "cpu")
    first = next(g for g, n in enumerate(sizes) if n)
    assert padded.first == first and padded.rows == max(sizes)
    assert padded.padding == padded.count * max(sizes) / sum(sizes)
    assert (padded.index is None) == (padded.padding == 1.0)
    x = torch.randn(sum(sizes), 16, dtype=dtype)
    stack = torch.randn(len(sizes), 24, 16, dtype=dtype)
    out = grouped_linear(x, GroupedWeight(stack, torch.tensor(offsets, dtype=torch.int32), offsets, padded))
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, reference(x, list(stack), sizes), rtol=tolerance, atol=tolerance)
    assert calls == ([1] if padded.padding <= grouped.max_padding(x) else [])


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 0, 1]])
@pytest.mark.parametrize("weight_first", [True, False])
def test_one_row_per_group_matches_one_matmul_per_group(monkeypatch, weight_first, sizes):
    """A decode step of one sequence per variant (some variants without one): a batched GEMV, weights or rows first."""
    monkeypatch.setattr(grouped, "weight_first_pays", lambda x: weight_first)
    offsets = torch.tensor(sizes).cumsum(0).tolist()
    x = torch.randn(sum(sizes), 32, dtype=torch.bfloat16)
    stack = torch.randn(len(sizes), 48, 32, dtype=torch.bfloat16)
    out = padded_linear(x, stack, PaddedRows.of(offsets, "cpu"))
    assert out.shape == (sum(sizes), 48) and out.is_contiguous()
    torch.testing.assert_close(out, reference(x, list(stack), sizes), rtol=1e-2, atol=1e-2)


def test_padding_beyond_none_only_for_fp32_and_native_cpu_bf16(monkeypatch):
    monkeypatch.setattr(grouped, "bf16_matmul_is_emulated", lambda: False)
    assert grouped.max_padding(torch.ones(1)) == grouped.FP32_MAX_PADDING
    assert grouped.max_padding(torch.ones(1, dtype=torch.bfloat16)) == grouped.NATIVE_BF16_MAX_PADDING
    assert grouped.max_padding(torch.ones(1, dtype=torch.float16)) == grouped.DEFAULT_MAX_PADDING
    assert grouped.max_padding(torch.ones(1, dtype=torch.bfloat16, device="meta")) == grouped.DEFAULT_MAX_PADDING  # not a CPU
    monkeypatch.setattr(grouped, "bf16_matmul_is_emulated", lambda: True)
    assert grouped.max_padding(torch.ones(1, dtype=torch.bfloat16)) == grouped.DEFAULT_MAX_PADDING


def test_weight_first_only_for_bf16_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(grouped, "bf16_matmul_is_emulated", lambda: False)
    monkeypatch.setattr(grouped, "has_amx_bf16", lambda: True)
    assert grouped.weight_first_pays(torch.ones(1, dtype=torch.bfloat16))
    assert not grouped.weight_first_pays(torch.ones(1))
    monkeypatch.setattr(grouped, "has_amx_bf16", lambda: False)  # AVX512-BF16 without AMX (Zen 4): rows first
    assert not grouped.weight_first_pays(torch.ones(1, dtype=torch.bfloat16))
    monkeypatch.setattr(grouped, "bf16_matmul_is_emulated", lambda: True)
    monkeypatch.setattr(grouped, "has_amx_bf16", lambda: True)
    assert not grouped.weight_first_pays(torch.ones(1, dtype=torch.bfloat16))


def test_no_padded_layout_without_rows():
    assert PaddedRows.of([0, 0], "cpu") is None


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_gathered_expert_gemv_matches_the_loop_over_experts(dtype, tokens):
    experts, top_k, hidden_size, intermediate = 6, 2, 16, 24
    gate_up = torch.randn(experts, 2 * intermediate, hidden_size, dtype=dtype)
    down = torch.randn(experts, hidden_size, intermediate, dtype=dtype)
    hidden = torch.randn(tokens, hidden_size, dtype=dtype)
    expert_ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k)
    expected = torch.zeros_like(hidden)
    for expert, rows, slots in group_tokens_by_expert(expert_ids):
        expected.index_add_(0, rows, (swiglu_mlp(hidden[rows], gate_up[expert], down[expert]) * weights.flatten()[slots, None]).to(dtype))
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    scale = expected.abs().max()
    torch.testing.assert_close(experts_module.gathered_expert_gemv(hidden, expert_ids, weights, gate_up, down) / scale, expected / scale, rtol=tolerance, atol=tolerance)


def test_gathered_gemv_only_for_small_copies_in_native_cpu_bf16(monkeypatch):
    monkeypatch.setattr(experts_module, "runs_native_cpu_bf16", lambda x: True)
    small_gate_up, small_down = torch.empty(4, 512, 128, dtype=torch.bfloat16), torch.empty(4, 128, 256, dtype=torch.bfloat16)  # 192 KiB
    hidden = torch.empty(1, 128, dtype=torch.bfloat16)
    assert experts_module.gathered_gemv_pays(hidden, torch.zeros(8, 2, dtype=torch.long), small_gate_up, small_down)  # 3 MiB
    assert not experts_module.gathered_gemv_pays(hidden, torch.zeros(9, 2, dtype=torch.long), small_gate_up, small_down)
    monkeypatch.setattr(experts_module, "runs_native_cpu_bf16", lambda x: False)
    assert not experts_module.gathered_gemv_pays(hidden, torch.zeros(1, 2, dtype=torch.long), small_gate_up, small_down)


def test_one_row_as_mv_except_for_native_bf16_without_amx(monkeypatch):
    bf16, fp32 = torch.ones(1, 4, dtype=torch.bfloat16), torch.ones(1, 4)
    monkeypatch.setattr(grouped, "bf16_matmul_is_emulated", lambda: False)
    monkeypatch.setattr(grouped, "has_amx_bf16", lambda: False)  # Zen 4
    assert not grouped.mv_pays(bf16) and grouped.mv_pays(fp32)
    monkeypatch.setattr(grouped, "has_amx_bf16", lambda: True)  # Sapphire Rapids
    assert grouped.mv_pays(bf16)
    monkeypatch.setattr(grouped, "bf16_matmul_is_emulated", lambda: True)  # AVX2
    monkeypatch.setattr(grouped, "has_amx_bf16", lambda: False)
    assert grouped.mv_pays(bf16)
    assert not grouped.mv_pays(torch.ones(1, 4, device="meta"))


@pytest.mark.parametrize("as_mv", [True, False])
def test_one_row_linear_matches_f_linear_either_way(monkeypatch, as_mv):
    monkeypatch.setattr(ops, "mv_pays", lambda x: as_mv)
    monkeypatch.setattr(ops, "native_gemv_pays", lambda x, weight: False)  # torch's paths, where the native GEMV would run
    x, weight, bias = torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(96, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.linear(x, weight, bias), F.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16), rtol=2e-2, atol=2e-2)
