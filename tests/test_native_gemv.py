"""moeplex's native gathered bf16 GEMV: each row times its own matrix, exact to float32 sums, batch-invariant, clear refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeplex.model import experts as experts_module
from moeplex.model import grouped, native_gemv, ops
from moeplex.model.grouped import GroupedWeight, grouped_linear

pytestmark = pytest.mark.skipif(not native_gemv.available(), reason="the native gathered GEMV needs x86-64 with AVX512-BF16 and a C compiler")

bf16 = torch.bfloat16


def random_operands(rows: int, matrices: int, out: int, k: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=generator) * torch.rand(rows, 1, generator=generator) * 4).to(bf16)
    stack = torch.randn(matrices, out, k, generator=generator).to(bf16)
    index = torch.randint(0, matrices, (rows,), generator=generator)
    return x, stack, index


def float64_reference(x, stack, index):
    return torch.einsum("rk,rok->ro", x.double(), stack[index].double())


@pytest.mark.parametrize("rows,matrices,out,k", [(1, 1, 16, 32), (3, 1, 40, 64), (9, 2, 100, 128), (7, 5, 384, 96), (16, 3, 33, 256)])
def test_float32_output_is_the_float32_sum_of_the_bf16_products(rows, matrices, out, k):
    x, stack, index = random_operands(rows, matrices, out, k, seed=rows * out + k)
    if rows > 3:  # runs of rows sharing a matrix (the 4-, 2- and 1-row paths) beside rows alone
        index[: rows // 2] = index[0]
    got = native_gemv.gathered_gemv(x, stack, index, torch.float32)
    reference = float64_reference(x, stack, index)
    magnitude = torch.einsum("rk,rok->ro", x.double().abs(), stack[index].double().abs())
    assert got.shape == (rows, out) and got.dtype == torch.float32
    assert ((got.double() - reference).abs() <= 1e-5 * magnitude + 1e-6).all()


def test_bf16_output_rounds_the_float32_sum():
    x, stack, index = random_operands(6, 3, 200, 128, seed=1)
    as_float = native_gemv.gathered_gemv(x, stack, index, torch.float32)
    as_bf16 = native_gemv.gathered_gemv(x, stack, index)
    assert as_bf16.dtype == bf16
    assert torch.equal(as_bf16, as_float.to(bf16))  # round to nearest even, as torch's cast


def test_each_row_is_the_same_whatever_rows_share_its_call():
    """A sequence's logits must not depend on the batch it runs in (mixed-variant batches give each variant's own tokens)."""
    x, stack, index = random_operands(8, 4, 160, 128, seed=2)
    index[:5] = 1  # five rows on one matrix: computed as 4 + 1 rows
    together = native_gemv.gathered_gemv(x, stack, index)
    for row in range(8):
        alone = native_gemv.gathered_gemv(x[row : row + 1], stack, index[row : row + 1])
        assert torch.equal(together[row], alone[0])


def test_threads_split_large_matrices_without_changing_the_result():
    x, stack, index = random_operands(4, 2, 2048, 1024, seed=3)  # above the kernel's per-run threshold for threads
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_gemv.gathered_gemv(x, stack, index)
        torch.set_num_threads(2)
        two = native_gemv.gathered_gemv(x, stack, index)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


def test_refuses_what_it_cannot_multiply():
    x, stack, index = random_operands(2, 2, 16, 64, seed=4)
    with pytest.raises(native_gemv.NativeGemvError, match="multiple of 32"):
        native_gemv.gathered_gemv(x[:, :48], stack[:, :, :48].contiguous(), index)
    with pytest.raises(native_gemv.NativeGemvError, match=r"x \(2, 32\)"):  # rows narrower than the matrices
        native_gemv.gathered_gemv(x[:, :32].contiguous(), stack, index)
    with pytest.raises(native_gemv.NativeGemvError, match="float32"):
        native_gemv.gathered_gemv(x.float(), stack, index)
    with pytest.raises(native_gemv.NativeGemvError, match="index"):
        native_gemv.gathered_gemv(x, stack, index[:1])
    with pytest.raises(native_gemv.NativeGemvError, match="float32 or bf16"):
        native_gemv.gathered_gemv(x, stack, index, torch.float16)
    with pytest.raises(native_gemv.NativeGemvError):
        native_gemv.gathered_gemv(x, stack.transpose(1, 2), index)  # not contiguous
    with pytest.raises(native_gemv.NativeGemvError, match=r"outside 0\.\.1"):
        native_gemv.gathered_gemv(x, stack, torch.tensor([0, 2]))
    with pytest.raises(native_gemv.NativeGemvError, match=r"outside 0\.\.1"):
        native_gemv.gathered_gemv(x, stack, torch.tensor([-1, 0]))


def test_the_switch_turns_it_off():
    with native_gemv.SWITCH.turned_off():
        assert not native_gemv.available()
        assert not grouped.native_gemv_pays(torch.empty(2, 64, dtype=bf16), torch.empty(3, 16, 64, dtype=bf16))
    assert native_gemv.available()


def test_pays_for_few_rows_on_small_or_wide_matrices():
    small, wide = torch.empty(128, 128, dtype=bf16), torch.empty(4096, 1024, dtype=bf16)
    pays = grouped.native_gemv_pays
    assert pays(torch.empty(16, 128, dtype=bf16), small) and not pays(torch.empty(17, 128, dtype=bf16), small)
    assert pays(torch.empty(4, 1024, dtype=bf16), wide) and not pays(torch.empty(5, 1024, dtype=bf16), wide)
    assert pays(torch.empty(16, 1024, dtype=bf16), wide.unsqueeze(0), rows_per_matrix=1)  # rows of distinct matrices
    assert not pays(torch.empty(2, 128), small.float())  # float32: torch's matmuls
    assert not pays(torch.empty(2, 48, dtype=bf16), torch.empty(8, 48, dtype=bf16))  # 48 inputs: not a multiple of 32


def test_linear_and_grouped_linear_take_it_and_match_torch():
    x, stack, _ = random_operands(6, 3, 96, 64, seed=5)
    sizes = [2, 0, 4]
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)
    group_of_row = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    weight = GroupedWeight(stack, offsets, offsets.tolist(), None, group_of_row)
    native = grouped_linear(x, weight)
    with native_gemv.SWITCH.turned_off():
        expected = grouped_linear(x, weight)
    torch.testing.assert_close(native, expected, rtol=2e-2, atol=2e-2)

    bias = torch.randn(96).to(bf16)
    with native_gemv.SWITCH.turned_off():
        plain = ops.linear(x, stack[0], bias)
    torch.testing.assert_close(ops.linear(x, stack[0], bias), plain, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(plain, F.linear(x.float(), stack[0].float(), bias.float()).to(bf16), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [1, 3, 16, 70])  # 70: more rows than its shared zero index holds
def test_gemv_is_the_gathered_gemv_with_one_matrix_and_linear_takes_it(rows, monkeypatch):
    x, stack, _ = random_operands(rows, 1, 48, 96, seed=rows)
    out = native_gemv.gemv(x, stack[0])
    assert out.dtype == bf16 and out.shape == (rows, 48)
    assert torch.equal(out, native_gemv.gathered_gemv(x, stack, torch.zeros(rows, dtype=torch.int64)))
    calls = []
    monkeypatch.setattr(native_gemv, "gemv", lambda *args: calls.append(args) or out)
    ops.linear(x, stack[0])
    assert len(calls) == (rows <= 16)  # beyond 16 rows oneDNN's matmul pays (`native_gemv_pays`)


@pytest.mark.parametrize("tokens,experts", [(1, 12), (4, 12), (8, 12), (8, 3)])  # 3 experts: tokens share them
def test_experts_of_a_decode_step_match_the_copied_gemvs(tokens, experts):
    generator = torch.Generator().manual_seed(tokens * experts)
    top_k, hidden_size, intermediate = 2, 128, 96
    gate_up = torch.randn(experts, 2 * intermediate, hidden_size, generator=generator).to(bf16) / 8
    down = torch.randn(experts, hidden_size, intermediate, generator=generator).to(bf16) / 8
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(bf16)
    expert_ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    native = experts_module.native_expert_gemv(hidden, expert_ids, weights, gate_up, down)
    copied = experts_module.gathered_expert_gemv(hidden, expert_ids, weights, gate_up, down)
    scale = copied.abs().max()
    torch.testing.assert_close(native / scale, copied / scale, rtol=3e-2, atol=3e-2)
    assert torch.equal(native[:1], experts_module.native_expert_gemv(hidden[:1], expert_ids[:1], weights[:1], gate_up, down))


def test_experts_take_it_while_few_tokens_share_a_wide_expert():
    wide_gate_up, wide_down = torch.empty(8, 4096, 1024, dtype=bf16), torch.empty(8, 1024, 2048, dtype=bf16)
    hidden = torch.empty(8, 1024, dtype=bf16)
    spread = torch.arange(16).remainder(8).view(8, 2)  # each expert chosen twice
    crowded = torch.zeros(8, 2, dtype=torch.long)
    crowded[:, 1] = torch.arange(8)  # expert 0 chosen by all 8 tokens
    pays = experts_module.native_experts_pay
    assert pays(hidden, spread, wide_gate_up, wide_down)
    assert not pays(hidden, crowded, wide_gate_up, wide_down)  # one call would read expert 0 once per 4 tokens: oneDNN's grouped matmul wins
    assert not pays(torch.empty(9, 1024, dtype=bf16), torch.arange(18).remainder(8).view(9, 2), wide_gate_up, wide_down)  # 18 rows


def test_without_a_compiler_linear_falls_back_to_torch(python_without_compiler):
    script = (
        "import warnings, torch\n"
        "import torch.nn.functional as F\n"
        "from moeplex.model import native_gemv, ops\n"
        "x, w = torch.randn(3, 64).bfloat16(), torch.randn(32, 64).bfloat16()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    same = torch.equal(ops.linear(x, w), F.linear(x, w))\n"
        "print(same, native_gemv.available(), any('could not be built' in str(w.message) for w in caught))\n"
    )
    assert python_without_compiler(script).split() == ["True", "False", "True"]
