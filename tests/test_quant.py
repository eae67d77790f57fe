"""Quantized experts: int8/int4 formats, mixed-precision expert compute, quantized models and banks, policies."""

from __future__ import annotations

import pytest
import torch

from moeplex.consolidate.calibration import ExpertInputs, record_expert_inputs
from moeplex.model.attention import SequenceChunk
from moeplex.model.experts import DenseExperts
from moeplex.model.runtime import load_model
from moeplex.quant.apply import quantize_bank_experts, quantize_model_experts
from moeplex.quant.experts import QuantizedExperts, quantize_expert
from moeplex.quant import kernels, native_int4
from moeplex.quant.formats import PRECISIONS
from moeplex.quant.int4 import quantize_int4
from moeplex.quant.int8 import quantize_int8
from moeplex.quant.output_error import expert_output_errors
from moeplex.quant.policies import LeastErrorFirst, LeastRoutedFirst, RandomSelection
from moeplex.quant.sizes import expert_nbytes
from moeplex.store.experts import ExpertBank, StoreExperts
from tests.conftest import saved_random_model

BF16_EPS = 2.0**-8  # relative rounding of one bf16 value


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def relative_error(approximate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((approximate.float() - reference.float()).norm() / reference.float().norm())


# ---- formats ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(192, 64), (256, 512), (64, 96)])
def test_int8_dequantized_weight_is_within_half_a_step_of_each_row(shape):
    weight = torch.randn(*shape, generator=generator(1))
    packed = quantize_int8(weight)
    step = weight.abs().amax(dim=1, keepdim=True) / 127  # [N, 1]
    assert packed.qweight.dtype == torch.int8 and packed.qweight.shape == shape
    assert ((packed.dequantize() - weight).abs() <= 0.5 * step * (1 + 2 * BF16_EPS) + 1e-7).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_dequantized_weight_is_within_half_a_step_of_its_group(group_size):
    rows, cols = 96, 256
    weight = torch.randn(rows, cols, generator=generator(2)) * torch.linspace(0.1, 3.0, cols)  # groups differ
    packed = quantize_int4(weight, group_size)
    groups = weight.reshape(rows, cols // group_size, group_size)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(group_size, dim=1)  # [N, K]
    bound = 0.5 * step + 4 * BF16_EPS * weight.abs().max(dim=1, keepdim=True).values  # bf16 scale, zero and output
    assert ((packed.dequantize() - weight).abs() <= bound).all()
    assert packed.nbytes == rows * cols // 2 + (cols // group_size) * rows * 2 * 2  # 4 bits + bf16 scale, zero


@pytest.mark.parametrize("activation_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_matmul_error_against_fp32_reference(activation_dtype, rows):
    weight = torch.randn(256, 512, generator=generator(3))
    x = torch.randn(rows, 512, generator=generator(4)).to(activation_dtype)
    reference = x.float() @ weight.T  # [rows, 256]
    y8, y4 = quantize_int8(weight).matmul(x), quantize_int4(weight, 32).matmul(x)
    assert y8.dtype == y4.dtype == activation_dtype and y8.shape == y4.shape == reference.shape
    assert relative_error(y8, reference) < 0.015  # measured ~0.008
    assert 0.02 < relative_error(y4, reference) < 0.11  # measured ~0.08 (16 levels over a gaussian group)


def test_int4_rejects_group_sizes_that_do_not_fit():
    weight = torch.randn(64, 96, generator=generator(5))
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int4(weight, 64)
    with pytest.raises(ValueError, match="one of"):
        quantize_int4(weight, 48)


# ---- mixed-precision expert compute ---------------------------------------------------------------------


def random_dense_experts(layers=2, experts=4, hidden=64, inter=96, seed=6) -> DenseExperts:
    g = generator(seed)
    gate_up = [torch.randn(experts, 2 * inter, hidden, generator=g).bfloat16() * 0.2 for _ in range(layers)]
    down = [torch.randn(experts, hidden, inter, generator=g).bfloat16() * 0.2 for _ in range(layers)]
    return DenseExperts([None, *gate_up], [None, *down])  # layer 0 is dense


def routing(tokens: int, experts: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = generator(seed)
    hidden = torch.randn(tokens, 64, generator=g).bfloat16()
    expert_ids = torch.stack([torch.randperm(experts, generator=g)[:2] for _ in range(tokens)])  # [T, 2]
    weights = torch.softmax(torch.randn(tokens, 2, generator=g), dim=-1)
    return hidden, expert_ids, weights


@pytest.mark.parametrize("tokens", [1, 7])
def test_all_unquantized_experts_equal_dense_experts_exactly(tokens):
    dense = random_dense_experts()
    quantized = QuantizedExperts.from_dense(dense, {})
    hidden, expert_ids, weights = routing(tokens, 4, seed=7)
    for layer in (1, 2):
        assert torch.equal(quantized(layer, hidden, expert_ids, weights), dense(layer, hidden, expert_ids, weights))
    assert quantized.nbytes == dense.nbytes


def test_mixed_precision_experts_are_close_and_exact_where_unquantized():
    dense = random_dense_experts()
    precision_of = {(1, 0): "int4", (1, 1): "int8", (2, 3): "int4"}
    quantized = QuantizedExperts.from_dense(dense, precision_of, group_size=32)
    assert {p: v for p, v in quantized.precisions.items() if v != "bf16"} == precision_of
    hidden, expert_ids, weights = routing(16, 4, seed=8)
    error = relative_error(quantized(1, hidden, expert_ids, weights), dense(1, hidden, expert_ids, weights))
    assert 0.005 < error < 0.1
    only_unquantized = torch.tensor([[2, 3]]).expand(16, 2)  # layer 1's experts 2 and 3 stay bf16
    assert torch.equal(quantized(1, hidden, only_unquantized, weights), dense(1, hidden, only_unquantized, weights))
    assert quantized.nbytes < dense.nbytes


def test_one_token_gives_the_grouped_paths_sums_bit_for_bit(monkeypatch):
    mixtures = []  # the calls that ran all-int4 choices in one native call, where the native kernel runs
    spied = native_int4.swiglu_mixture
    monkeypatch.setattr(native_int4, "swiglu_mixture", lambda *args: mixtures.append(args) or spied(*args))
    dense = random_dense_experts()
    precision_of = {(1, 0): "int4", (1, 1): "int8", (1, 2): "int4"}  # expert 3 stays bf16
    quantized = QuantizedExperts.from_dense(dense, precision_of, group_size=32)
    hidden, expert_ids, weights = routing(1, 4, seed=9)
    for ids in (expert_ids, torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), torch.tensor([[3, 0]]), torch.tensor([[2, 0]])):  # [2, 0]: all int4
        one = quantized(1, hidden, ids, weights)
        assert one.shape == hidden.shape and one.dtype == hidden.dtype
        assert torch.equal(one, quantized.grouped(1, hidden, ids, weights))
    assert len(mixtures) == (1 if native_int4.available() and kernels.uses_native_int4(32) else 0)


def test_unknown_positions_and_precisions_are_rejected():
    dense = random_dense_experts()
    with pytest.raises(ValueError, match="no expert at positions"):
        QuantizedExperts.from_dense(dense, {(0, 0): "int4"})  # layer 0 has no experts
    with pytest.raises(ValueError, match="unknown precision 'int2'"):
        QuantizedExperts.from_dense(dense, {(1, 0): "int2"})


def test_quantized_bank_serves_every_variant_sharing_it():
    dense = random_dense_experts(layers=1, experts=4)
    bank = ExpertBank(["a", "b", "c", "d"], DenseExperts(dense.gate_up[1:], dense.down[1:]))
    door = StoreExperts(bank, [torch.tensor([3, 2, 1, 0])])  # a variant whose expert i is bank row 3 - i
    hidden, expert_ids, weights = routing(9, 4, seed=9)
    before = door(0, hidden, expert_ids, weights)
    quantize_bank_experts(bank, {"a": "int4", "b": "int8"}, group_size=32)
    assert isinstance(bank.compute, QuantizedExperts)
    assert bank.compute.precisions == {(0, 0): "int4", (0, 1): "int8", (0, 2): "bf16", (0, 3): "bf16"}
    after = door(0, hidden, expert_ids, weights)
    assert 0.005 < relative_error(after, before) < 0.1
    with pytest.raises(ValueError, match="not in the bank"):
        quantize_bank_experts(ExpertBank(["a"], DenseExperts(dense.gate_up[1:], dense.down[1:])), {"z": "int4"})


# ---- a whole (tiny) model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_folder(tmp_path_factory):
    return saved_random_model(tmp_path_factory.mktemp("quant_mixtral"), seed=11)


@pytest.fixture(scope="module")
def tiny_mixtral(mixtral_folder):
    return load_model(mixtral_folder, dtype=torch.float32)


def all_logits(model, token_ids: torch.Tensor) -> torch.Tensor:
    return model.forward(token_ids, [SequenceChunk(model.new_cache(token_ids.numel()), 0, token_ids.numel())], all_logits=True)


def all_positions(model) -> list[tuple[int, int]]:
    return [(layer, e) for layer in range(model.spec.num_layers) for e in range(model.spec.num_experts)]


def test_quantized_model_logits_are_close_to_the_original(tiny_mixtral, mixtral_folder):
    token_ids = torch.randint(3, tiny_mixtral.spec.vocab_size, (24,), generator=generator(12))
    reference = all_logits(tiny_mixtral, token_ids)
    # the yardstick: this tiny random model is so sensitive that bf16 alone moves its logits by ~14%
    bf16_error = relative_error(all_logits(load_model(mixtral_folder, dtype=torch.bfloat16), token_ids), reference)
    unquantized = quantize_model_experts(tiny_mixtral, {})
    assert torch.equal(all_logits(unquantized, token_ids), reference)
    errors = {}
    for precision in ("int8", "int4"):
        model = quantize_model_experts(tiny_mixtral, {p: precision for p in all_positions(tiny_mixtral)}, group_size=32)
        assert model.backbone is tiny_mixtral.backbone
        errors[precision] = relative_error(all_logits(model, token_ids), reference)
    assert 0 < errors["int8"] < min(bf16_error, errors["int4"]), (bf16_error, errors)  # measured 0.13 / 0.14
    assert errors["int4"] < 2 * bf16_error, (bf16_error, errors)  # measured 0.21; a wrong packing gives > 1


def test_measured_errors_rank_int8_below_int4_on_calibration_inputs(tiny_mixtral):
    token_ids = torch.randint(3, tiny_mixtral.spec.vocab_size, (64,), generator=generator(13))
    inputs = record_expert_inputs(tiny_mixtral, token_ids, cap=32)
    errors = expert_output_errors(tiny_mixtral.experts, inputs, group_size=32)
    assert set(errors) == set(all_positions(tiny_mixtral))
    routed = [p for p in errors if inputs.frequency[p] > 0]
    assert routed
    for position in routed:
        assert 0 < errors[position]["int8"] < errors[position]["int4"] < 0.3


def test_a_corrupted_expert_has_the_largest_measured_error():
    dense = random_dense_experts(layers=1, experts=3)
    inputs = ExpertInputs(
        {(1, e): torch.randn(8, 64, generator=generator(14 + e)) for e in range(3)}, {(1, e): 1 / 3 for e in range(3)}
    )
    dense.gate_up[1][1, :, 0] = 40.0  # one outlier column: int4 groups spanning it lose their resolution
    errors = expert_output_errors(dense, inputs, precisions=("int4",), group_size=32)
    assert max(errors, key=lambda p: errors[p]["int4"]) == (1, 1)


# ---- selection policies -----------------------------------------------------------------------------------

POSITIONS = [(layer, e) for layer in range(3) for e in range(4)]


def test_least_routed_first_quantizes_the_least_routed():
    frequency = {p: (7 * i % 12) / 12 for i, p in enumerate(POSITIONS)}  # a permutation of 0..11 / 12
    chosen = LeastRoutedFirst(frequency).choose(POSITIONS, {"int4": 3, "int8": 2})
    by_frequency = sorted(POSITIONS, key=frequency.get)
    assert [chosen[p] for p in by_frequency] == ["int4"] * 3 + ["int8"] * 2 + ["bf16"] * 7


def test_least_error_first_weighs_error_by_frequency():
    positions = [(0, 0), (0, 1), (0, 2)]
    frequency = {(0, 0): 0.9, (0, 1): 0.05, (0, 2): 0.05}
    errors = {(0, 0): {"int4": 0.01, "int8": 0.001}, (0, 1): {"int4": 0.5, "int8": 0.05}, (0, 2): {"int4": 0.1, "int8": 0.2}}
    chosen = LeastErrorFirst(errors, frequency).choose(positions, {"int4": 1, "int8": 1})
    # int4 costs: 0.009, 0.025, 0.005 -> (0, 2); then int8 costs of the rest: 0.0009, 0.0025 -> (0, 0)
    assert chosen == {(0, 2): "int4", (0, 0): "int8", (0, 1): "bf16"}
    assert LeastRoutedFirst(frequency).choose(positions, {"int4": 1, "int8": 1}) == {
        (0, 1): "int4", (0, 2): "int8", (0, 0): "bf16"
    }


def test_random_selection_is_seeded_and_respects_counts():
    counts = {"int4": 5, "int8": 4}
    first = RandomSelection(seed=3).choose(POSITIONS, counts)
    assert RandomSelection(seed=3).choose(list(reversed(POSITIONS)), counts) == first
    assert [list(first.values()).count(p) for p in ("int4", "int8", "bf16")] == [5, 4, 3]
    others = [RandomSelection(seed=s).choose(POSITIONS, counts) for s in range(4, 8)]
    assert any(other != first for other in others)


@pytest.mark.parametrize(
    "counts, message",
    [
        ({"int4": 10, "int8": 3}, "only 12"),
        ({"int4": -1}, "non-negative integer"),
        ({"int4": 1.5}, "non-negative integer"),
        ({"int3": 1}, "may only name"),
    ],
)
def test_bad_counts_are_clear_errors(counts, message):
    frequency = {p: 0.1 for p in POSITIONS}
    errors = {p: {"int4": 0.1, "int8": 0.01} for p in POSITIONS}
    for policy in (RandomSelection(), LeastRoutedFirst(frequency), LeastErrorFirst(errors, frequency)):
        with pytest.raises(ValueError, match=message):
            policy.choose(POSITIONS, counts)


def test_policies_name_positions_they_know_nothing_about():
    with pytest.raises(ValueError, match="no routing frequency"):
        LeastRoutedFirst({(0, 0): 0.5}).choose([(0, 0), (0, 1)], {"int4": 1})
    with pytest.raises(ValueError, match="no measured int8 error"):
        LeastErrorFirst({(0, 0): {"int4": 0.1}}, {(0, 0): 0.5}).choose([(0, 0)], {"int8": 1})


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("group_size", [32, 128])
def test_expert_bytes_from_the_shape_match_a_quantized_expert(precision, group_size):
    hidden, inter = 128, 256
    gate_up, down = torch.randn(2 * inter, hidden, dtype=torch.bfloat16), torch.randn(hidden, inter, dtype=torch.bfloat16)
    assert expert_nbytes(hidden, inter, precision, group_size) == quantize_expert(gate_up, down, precision, group_size).nbytes


def test_a_quantized_expert_moves_within_its_device_kind_only():
    gate_up, down = torch.randn(128, 64, dtype=torch.bfloat16), torch.randn(64, 64, dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    for precision in PRECISIONS:
        expert = quantize_expert(gate_up, down, precision, 32)
        moved = expert.to("cpu")
        assert moved.device.type == "cpu" and moved.nbytes == expert.nbytes and torch.equal(moved(x), expert(x))
    with pytest.raises(ValueError, match="int4 expert packed for cpu cannot move to meta"):
        quantize_expert(gate_up, down, "int4", 32).to("meta")
