"""Quantized copies of experts in the store: exact round trips, the index, damage, and their use by placements."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
import safetensors.torch
import torch
import transformers
import yaml

import moeplex.quant.experts as quant_experts
from moeplex.consolidate.family_spec import load_family_spec
from moeplex.errors import ExpertReadError
from moeplex.planner.placement import Placement, apply_placement, write_placement
from moeplex.quant import store_copies
from moeplex.quant.experts import QuantizedExpert, quantize_expert
from moeplex.quant.formats import UNQUANTIZED
from moeplex.quant.int4 import int4_codes
from moeplex.quant.store_copies import QuantizedCopies, copy_format, write_quantized_copies
from moeplex.store import StoreError, StoreReader, verify_store, write_store
from moeplex.store.checksums import sha256_bytes
from moeplex.store.experts import BANK_LAYER
from tests.conftest import make_hf_model
from tests.test_store import flip_bytes, identity_plan_of, perturb

# hidden and expert intermediate sizes of 128, so every int4 group size (32, 64, 128) divides both matrices
CONFIG = dict(
    vocab_size=160, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
)
FORMATS = [("int8", 128), ("int4", 32), ("int4", 128)]
INDEX = "quantized/index.json"


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory):
    """A bf16 store of a base and one variant that tuned two experts: 10 unique experts."""
    root = tmp_path_factory.mktemp("copies_family")
    config = transformers.MixtralConfig(**CONFIG)
    make_hf_model(config, seed=31).save_pretrained(root / "base")
    model = make_hf_model(config, seed=31)
    perturb(model, [(0, 1), (1, 2)], seed=32)
    model.save_pretrained(root / "tuned")
    (root / "family.yaml").write_text(yaml.safe_dump({"name": "copies", "base": "base", "variants": {"tuned": "tuned"}}))
    family = load_family_spec(root / "family.yaml")
    return write_store(family, identity_plan_of(family), root / "store", dtype=torch.bfloat16, progress=False)


@pytest.fixture
def store(pristine_store, tmp_path):
    """A fresh copy that a test may add copies to or damage."""
    return shutil.copytree(pristine_store, tmp_path / "store")


def expert_ids(store) -> list[str]:
    return sorted(StoreReader(store).manifest.experts)


def copy_path(store, expert_id: str, precision: str, group_size: int):
    return store / "quantized" / copy_format(precision, group_size) / f"{expert_id}.safetensors"


def in_memory(store, expert_id: str, precision: str, group_size: int) -> QuantizedExpert:
    tensors = StoreReader(store).read_expert(expert_id)
    return quantize_expert(tensors["gate_up"], tensors["down"], precision, group_size)


def randn(rows: int, columns: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def assert_same_expert(got: QuantizedExpert, expected: QuantizedExpert, seed: int = 0) -> None:
    """Same precision, the same stored fields bit for bit, and the same outputs on random inputs."""
    assert got.precision == expected.precision
    for matrix in ("gate_up", "down"):
        a, b = getattr(got, matrix), getattr(expected, matrix)
        assert type(a) is type(b)
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, (matrix, field.name)
    hidden = CONFIG["hidden_size"]
    assert torch.equal(got(randn(5, hidden, seed)), expected(randn(5, hidden, seed)))
    assert torch.equal(got.down.matmul(randn(3, CONFIG["intermediate_size"], seed + 1)),
                       expected.down.matmul(randn(3, CONFIG["intermediate_size"], seed + 1)))


# ---- writing and reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, group_size", FORMATS)
def test_copies_compute_exactly_what_in_memory_quantization_does(store, precision, group_size):
    ids = expert_ids(store)
    assert write_quantized_copies(store, dict.fromkeys(ids, precision), group_size, progress=False) == len(ids)
    copies = QuantizedCopies.load(store)
    for seed, expert_id in enumerate(ids):
        expected = in_memory(store, expert_id, precision, group_size)
        size = copy_path(store, expert_id, precision, group_size).stat().st_size
        for uncached in (False, True):
            copy, nbytes = copies.read(expert_id, precision, group_size, uncached=uncached)
            assert nbytes == size
            assert_same_expert(copy, expected, seed)
    assert verify_store(store) == []


def test_index_and_files_have_the_documented_layout(store):
    ids = expert_ids(store)[:3]
    write_quantized_copies(store, {ids[0]: "int8", ids[1]: "int4", ids[2]: "bf16"}, 64, progress=False)
    index = json.loads((store / INDEX).read_text())
    assert index["version"] == 1 and set(index["copies"]) == {"int8", "int4-g64"}
    for fmt, expert_id in (("int8", ids[0]), ("int4-g64", ids[1])):
        data = (store / "quantized" / fmt / f"{expert_id}.safetensors").read_bytes()
        assert index["copies"][fmt] == {
            expert_id: {"file": f"quantized/{fmt}/{expert_id}.safetensors", "bytes": len(data), "sha256": sha256_bytes(data)}
        }
    tensors = safetensors.torch.load((store / "quantized" / "int4-g64" / f"{ids[1]}.safetensors").read_bytes())
    gate_up = StoreReader(store).read_expert(ids[1])["gate_up"]  # [2I, H]
    q, scales_and_zeros = int4_codes(gate_up, 64)
    nibbles = tensors["gate_up.nibbles"]
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (gate_up.shape[0], gate_up.shape[1] // 2)
    assert torch.equal((nibbles & 0xF).int(), q[:, 0::2]) and torch.equal((nibbles >> 4).int(), q[:, 1::2])
    assert torch.equal(tensors["gate_up.scales_and_zeros"], scales_and_zeros)
    int8 = safetensors.torch.load((store / "quantized" / "int8" / f"{ids[0]}.safetensors").read_bytes())
    assert {name: t.dtype for name, t in int8.items()} == {
        "gate_up.qweight": torch.int8, "gate_up.scales": torch.bfloat16, "down.qweight": torch.int8, "down.scales": torch.bfloat16,
    }


def test_writing_again_writes_nothing_and_bf16_experts_get_no_copy(store):
    rng = random.Random(41)
    ids = expert_ids(store)
    precision = {expert_id: rng.choice(["bf16", "int8", "int4"]) for expert_id in ids}
    precision |= {ids[0]: "bf16", ids[1]: "int8", ids[2]: "int4"}
    quantized = {i: p for i, p in precision.items() if p != UNQUANTIZED}
    assert write_quantized_copies(store, precision, 32, progress=False) == len(quantized)
    index_text = (store / INDEX).read_text()
    assert write_quantized_copies(store, precision, 32, progress=False) == 0
    assert (store / INDEX).read_text() == index_text
    copies = QuantizedCopies.load(store)
    assert all(copies.has(i, p, 32) for i, p in quantized.items())
    assert not any(copies.has(i, p, 32) for p in ("int8", "int4") for i in ids if i not in quantized)
    int4 = [i for i, p in quantized.items() if p == "int4"]
    assert write_quantized_copies(store, dict.fromkeys(int4, "int4"), 128, progress=False) == len(int4)  # another format
    with pytest.raises(KeyError, match=f"no int4-g32 copy of expert {ids[0]}"):
        copies.read(ids[0], "int4", 32)


def test_an_interrupted_write_lists_only_complete_copies(store, monkeypatch):
    ids = expert_ids(store)
    real_replace_file, calls = store_copies.replace_file, []

    def interrupted_after_two(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_replace_file(path, data)

    monkeypatch.setattr(store_copies, "replace_file", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        write_quantized_copies(store, dict.fromkeys(ids, "int4"), 32, progress=False)
    monkeypatch.undo()
    copies = QuantizedCopies.load(store)
    assert sorted(copies.index["int4-g32"]) == sorted(ids[:2])
    assert sorted(p.name for p in (store / "quantized" / "int4-g32").iterdir()) == sorted(f"{i}.safetensors" for i in ids[:2])
    assert verify_store(store) == []
    assert write_quantized_copies(store, dict.fromkeys(ids, "int4"), 32, progress=False) == len(ids) - 2
    assert verify_store(store) == []


@pytest.mark.parametrize(
    "precision_of, group_size, message",
    [
        (lambda ids: {ids[0]: "int4", "f" * 64: "int8"}, 32, "expert ids not in the store's manifest: .*ffff"),
        (lambda ids: {ids[0]: "int2"}, 32, "unknown precision 'int2'"),
        (lambda ids: {ids[0]: "int4"}, 48, "int4 group size must be one of"),
    ],
)
def test_unknown_ids_precisions_and_group_sizes_are_refused_before_writing(store, precision_of, group_size, message):
    with pytest.raises(ValueError, match=message):
        write_quantized_copies(store, precision_of(expert_ids(store)), group_size, progress=False)
    assert not (store / "quantized").exists()


# ---- damage ---------------------------------------------------------------------------------------------------


@pytest.fixture
def store_with_copies(store):
    write_quantized_copies(store, dict.fromkeys(expert_ids(store), "int4"), 32, progress=False)
    return store


def test_a_corrupt_copy_is_reported_and_refused(store_with_copies):
    store, (damaged, sound) = store_with_copies, expert_ids(store_with_copies)[:2]
    flip_bytes(copy_path(store, damaged, "int4", 32))
    problems = verify_store(store)
    assert len(problems) == 1 and damaged in problems[0] and "corrupt" in problems[0] and INDEX in problems[0]
    copies = QuantizedCopies.load(store)
    with pytest.raises(ExpertReadError, match=rf"int4-g32 copy of expert {damaged}: file .*{damaged}\.safetensors is corrupt"):
        copies.read(damaged, "int4", 32)
    assert_same_expert(copies.read(sound, "int4", 32)[0], in_memory(store, sound, "int4", 32))


def test_a_truncated_copy_is_reported_and_refused(store_with_copies):
    store, expert_id = store_with_copies, expert_ids(store_with_copies)[0]
    path = copy_path(store, expert_id, "int4", 32)
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    problems = verify_store(store)
    assert len(problems) == 1 and f"has {size - 10} bytes, {INDEX} says {size}" in problems[0]
    copies = QuantizedCopies.load(store)
    for uncached in (False, True):
        with pytest.raises(ExpertReadError, match=rf"copy of expert {expert_id}: .*{expert_id}\.safetensors"):
            copies.read(expert_id, "int4", 32, uncached=uncached)


@pytest.mark.parametrize(
    "damage, found",
    [
        (lambda t: {("gate_up.codes" if k == "gate_up.nibbles" else k): v for k, v in t.items()}, "gate_up.codes"),
        (lambda t: t | {"down.scales_and_zeros": t["down.scales_and_zeros"].float()}, "down.scales_and_zeros .* float32"),
        (lambda t: t | {"gate_up.nibbles": t["gate_up.nibbles"][1:].clone()}, r"gate_up.nibbles \[255, 64\]"),
    ],
)
def test_a_copy_with_wrong_tensors_is_refused(store_with_copies, damage, found):
    """Tensors renamed, of another dtype or shape (the index updated to match, so only their layout is wrong)."""
    store, expert_id = store_with_copies, expert_ids(store_with_copies)[0]
    path = copy_path(store, expert_id, "int4", 32)
    data = safetensors.torch.save(damage(safetensors.torch.load(path.read_bytes())))
    path.write_bytes(data)
    index = json.loads((store / INDEX).read_text())
    index["copies"]["int4-g32"][expert_id] |= {"bytes": len(data), "sha256": sha256_bytes(data)}
    (store / INDEX).write_text(json.dumps(index))
    for uncached in (False, True):
        with pytest.raises(ExpertReadError, match=rf"copy of expert {expert_id}: .* holds .*{found}.*, expected"):
            QuantizedCopies.load(store).read(expert_id, "int4", 32, uncached=uncached)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], "truncated or not valid JSON"),
        (lambda text: json.dumps(json.loads(text) | {"version": 2}), "not an index of quantized copies of version 1"),
        (lambda text: json.dumps(json.loads(text) | {"copies": {"int3": {}}}), r"unknown copy formats \['int3'\]"),
        (lambda text: text.replace('"file": "quantized/int4-g32/', '"file": "experts/', 1), "file is 'experts/.*it must be"),
        (lambda text: text.replace('"bytes": ', '"bytes": "', 1).replace(',\n', '",\n', 1), "must be"),
    ],
)
def test_a_malformed_index_is_a_store_error_naming_it(store_with_copies, damage, message):
    path = store_with_copies / INDEX
    path.write_text(damage(path.read_text()))
    with pytest.raises(StoreError, match=rf"quantized/index\.json: .*{message}"):
        QuantizedCopies.load(store_with_copies)
    problems = verify_store(store_with_copies)
    assert len(problems) == 1 and INDEX in problems[0]


def test_verify_names_copies_of_unknown_experts_and_unlisted_files(store_with_copies):
    store, expert_id = store_with_copies, expert_ids(store_with_copies)[0]
    stranger = "e" * 64
    shutil.copy(copy_path(store, expert_id, "int4", 32), copy_path(store, stranger, "int4", 32))
    index = json.loads((store / INDEX).read_text())
    entry = index["copies"]["int4-g32"][expert_id]
    index["copies"]["int4-g32"][stranger] = entry | {"file": f"quantized/int4-g32/{stranger}.safetensors"}
    (store / INDEX).write_text(json.dumps(index))
    (store / "quantized" / "int8").mkdir()
    (store / "quantized" / "int8" / "stray.safetensors").write_bytes(b"x")
    problems = verify_store(store)
    assert len(problems) == 2
    assert any(stranger in p and "the manifest has no such expert" in p for p in problems)
    assert any("int8/stray.safetensors: file in the store that quantized/index.json does not list" in p for p in problems)


# ---- placements -----------------------------------------------------------------------------------------------


def test_a_placement_computes_the_same_with_and_without_copies(store, monkeypatch):
    reader = StoreReader(store)
    ids = expert_ids(store)
    rng = random.Random(43)
    precision = {expert_id: rng.choice(["bf16", "int8", "int4"]) for expert_id in ids}
    precision |= {ids[0]: "bf16", ids[1]: "int8", ids[2]: "int4", ids[3]: "int4"}
    quantized = {i: p for i, p in precision.items() if p != UNQUANTIZED}
    write_placement(store, Placement(precision, group_size=32))
    quantized_from_weights = []

    def counting_quantize_expert(gate_up, down, precision, group_size):
        quantized_from_weights.extend([precision] if precision != UNQUANTIZED else [])
        return quantize_expert(gate_up, down, precision, group_size)

    monkeypatch.setattr(quant_experts, "quantize_expert", counting_quantize_expert)

    def placed_bank(dtype=torch.bfloat16):
        quantized_from_weights.clear()
        bank = reader.load_expert_bank(ids, reader.spec("base"), dtype)
        apply_placement(store, bank)
        return bank

    reference = placed_bank()
    assert len(quantized_from_weights) == len(quantized)
    write_quantized_copies(store, dict(list(quantized.items())[:2]), 32, progress=False)
    write_quantized_copies(store, dict.fromkeys(quantized, "int4"), 128, progress=False)  # another group size: unused
    partly = placed_bank()
    assert len(quantized_from_weights) == len(quantized) - 2
    write_quantized_copies(store, quantized, 32, progress=False)
    fully = placed_bank()
    assert quantized_from_weights == []
    hidden = randn(9, CONFIG["hidden_size"], seed=44)
    rows = torch.randint(0, len(ids), (9, 2), generator=torch.Generator().manual_seed(45))
    weights = torch.rand(9, 2, generator=torch.Generator().manual_seed(46)).softmax(-1)
    expected = reference.compute(BANK_LAYER, hidden, rows, weights)
    for bank in (partly, fully):
        assert bank.compute.precisions == reference.compute.precisions
        for row, expert in enumerate(bank.compute.experts[BANK_LAYER]):
            assert_same_expert(expert, reference.compute.experts[BANK_LAYER][row], seed=row)
        assert torch.equal(bank.compute(BANK_LAYER, hidden, rows, weights), expected)
    placed_bank(torch.float32)  # copies are of bf16 weights: a float32 bank quantizes its own
    assert len(quantized_from_weights) == len(quantized)
