"""Merging baselines: the tensor math by hand, and whole tiny Mixtral checkpoints merged and reloaded."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moeplex.checkpoint import CheckpointReader
from moeplex.consolidate import merge as merge_module
from moeplex.consolidate import merge_methods as mm
from moeplex.consolidate.merge import MERGE_METHODS, merge_checkpoints, tensor_seed
from moeplex.errors import CheckpointError, MoeplexError

# ---------------------------------------------------------------- pure functions


def test_average_is_the_mean():
    tensors = [torch.randn(5, 7) for _ in range(3)]
    torch.testing.assert_close(mm.average(tensors), torch.stack(tensors).mean(0))


def test_average_computes_in_fp32():
    tensors = [torch.randn(64).to(torch.bfloat16) for _ in range(3)]
    merged = mm.average(tensors)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, torch.stack([t.float() for t in tensors]).mean(0))


def test_task_arithmetic_with_one_variant_and_scale_one_is_that_variant():
    base, variant = torch.randn(4, 6), torch.randn(4, 6)
    torch.testing.assert_close(mm.task_arithmetic(base, [variant], 1.0), variant)


def test_task_arithmetic_formula():
    base = torch.randn(10)
    variants = [torch.randn(10) for _ in range(3)]
    expected = base + 0.3 * sum(v - base for v in variants)
    torch.testing.assert_close(mm.task_arithmetic(base, variants, 0.3), expected)


def test_trim_keeps_the_largest_magnitudes_and_zeroes_the_rest():
    tau = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.05, 1.0, -0.4, 0.02, 3.0])
    expected = torch.tensor([0.0, -5.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0])
    torch.testing.assert_close(mm.trim_to_density(tau, 0.3), expected, rtol=0, atol=0)


def test_trim_random_tensor_keeps_density_fraction():
    tau = torch.randn(40, 25)
    trimmed = mm.trim_to_density(tau, 0.2)
    kept = trimmed != 0
    assert int(kept.sum()) == 200
    assert torch.equal(trimmed[kept], tau[kept])
    assert tau[kept].abs().min() >= tau[~kept].abs().max()


def test_ties_elects_sign_by_mass_and_averages_only_agreeing_entries():
    base = torch.zeros(4)
    variants = [
        torch.tensor([3.0, -2.0, 1.0, 0.0]),
        torch.tensor([-1.0, -2.0, -4.0, 0.0]),
        torch.tensor([-1.5, 5.0, 2.0, 0.0]),
    ]
    # entry 0: two of three are negative but the positive mass is larger -> +, mean of {3}
    # entry 1: mass +1 -> +, mean of {5}; entry 2: mass -1 -> -, mean of {-4}; entry 3: nothing
    stacked = torch.stack(variants)
    torch.testing.assert_close(mm.elect_sign(stacked), torch.tensor([1.0, 1.0, -1.0, 1.0]))
    merged = mm.ties(base, variants, density=1.0, scale=1.0)
    torch.testing.assert_close(merged, torch.tensor([3.0, 5.0, -4.0, 0.0]), rtol=0, atol=0)


def test_ties_trims_before_electing_and_applies_scale():
    base = torch.full((4,), 10.0)
    variants = [
        base + torch.tensor([4.0, 0.5, -0.1, 0.0]),
        base + torch.tensor([-0.3, -6.0, 2.0, 0.0]),
        base + torch.tensor([2.0, 0.2, -3.0, 0.0]),
    ]
    # density 0.5 keeps two entries per task vector: [4, .5, 0, 0], [0, -6, 2, 0], [2, 0, -3, 0]
    # entry 0: + -> mean{4, 2} = 3; entry 1: -5.5 -> - -> -6; entry 2: -1 -> - -> -3; entry 3: 0
    # (untrimmed, entry 2 would average {-0.1, -3} to -1.55)
    merged = mm.ties(base, variants, density=0.5, scale=0.5)
    torch.testing.assert_close(merged, base + 0.5 * torch.tensor([3.0, -6.0, -3.0, 0.0]))


def test_dare_without_dropping_is_task_arithmetic():
    base = torch.randn(8, 8)
    variants = [base + 0.1 * torch.randn(8, 8) for _ in range(3)]
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    torch.testing.assert_close(
        mm.dare(base, variants, 0.0, 0.7, generator), mm.task_arithmetic(base, variants, 0.7), rtol=0, atol=0
    )


def test_dare_keeps_about_one_minus_drop_rate_and_rescales_survivors():
    tau = torch.randn(100_000) + 0.01 * torch.sign(torch.randn(100_000))  # no exact zeros
    dropped = mm.drop_and_rescale(tau, 0.5, torch.Generator().manual_seed(3))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    torch.testing.assert_close(dropped[kept], tau[kept] * 2.0)


def test_dare_preserves_the_expected_value():
    base = torch.randn(256)
    variants = [base + torch.randn(256) for _ in range(2)]
    seeds = 400
    mean = sum(mm.dare(base, variants, 0.5, 1.0, torch.Generator().manual_seed(s)) for s in range(seeds)) / seeds
    expected = mm.task_arithmetic(base, variants, 1.0)
    # each variant's entry is 2*tau or 0: variance tau^2 per variant and draw
    std = torch.sqrt(sum((v - base) ** 2 for v in variants) / seeds)
    assert torch.all((mean - expected).abs() <= 5 * std + 1e-6)


def test_dare_is_deterministic_for_a_seed():
    base = torch.randn(50)
    variants = [base + torch.randn(50) for _ in range(2)]

    def run(seed):
        return mm.dare(base, variants, 0.9, 0.5, torch.Generator().manual_seed(seed))

    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))


@pytest.mark.parametrize(
    "call",
    [
        lambda: mm.trim_to_density(torch.randn(3), 0.0),
        lambda: mm.trim_to_density(torch.randn(3), 1.5),
        lambda: mm.drop_and_rescale(torch.randn(3), 1.0, torch.Generator()),
        lambda: mm.average([]),
    ],
)
def test_bad_arguments_are_rejected(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------- whole checkpoints

CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
)
PROBE = "model.layers.1.self_attn.q_proj.weight"


def save_family(folder, dtype=torch.float32, variants=3):
    """A random tiny Mixtral base and `variants` perturbed copies; returns (base folder, variant folders)."""
    model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**CONFIG), dtype=torch.float32)
    base_state = {name: param.detach().clone() for name, param in model.named_parameters()}

    def save(name):
        model.to(dtype).save_pretrained(folder / name)
        model.to(torch.float32)
        return folder / name

    base = save("base")
    folders = []
    for index in range(variants):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(base_state[name] + 0.05 * torch.randn_like(base_state[name]))
        folders.append(save(f"v{index}"))
    return base, folders


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("family"))


def load_merged(out):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def probe(folder, key=PROBE):
    return CheckpointReader(folder).get(key)


def expected_probe(method, base, variants, key=PROBE):
    b = probe(base, key)
    vs = [probe(v, key) for v in variants]
    if method == "average":
        return sum(vs) / len(vs)
    if method == "task-arithmetic":
        return b + 0.25 * sum(v - b for v in vs)
    if method == "ties":
        return mm.ties(b, vs, 0.3, 0.8)
    generator = torch.Generator().manual_seed(tensor_seed(5, key))
    return mm.dare(b, vs, 0.5, 0.6, generator)


OPTIONS = {
    "average": {},
    "task-arithmetic": dict(scale=0.25),
    "ties": dict(scale=0.8, density=0.3),
    "dare": dict(scale=0.6, drop_rate=0.5, seed=5),
}


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_merged_checkpoint_loads_and_follows_the_formula(method, family, tmp_path):
    base, variants = family
    out = merge_checkpoints(
        method, variants, tmp_path / "merged", None if method == "average" else base, progress=False, **OPTIONS[method]
    )
    model = load_merged(out)
    torch.testing.assert_close(model.state_dict()[PROBE], expected_probe(method, base, variants))
    expert_key = "model.layers.0.block_sparse_moe.experts.2.w2.weight"
    assert CheckpointReader(variants[0]).has(expert_key)
    torch.testing.assert_close(probe(out, expert_key), expected_probe(method, base, variants, expert_key))
    assert (out / "config.json").read_text() == (variants[0] / "config.json").read_text()
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == method and len(record["variants"]) == len(variants)
    assert not list(tmp_path.glob(".merged.*")), "staging folder left behind"


def test_dare_merge_is_reproducible_and_depends_on_seed(family, tmp_path):
    base, variants = family
    runs = [
        merge_checkpoints("dare", variants, tmp_path / name, base, seed=seed, progress=False)
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    a, b, c = (load_file(str(r / "model.safetensors")) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[PROBE], c[PROBE])


def test_sharded_output_loads_and_equals_single_file(family, tmp_path):
    base, variants = family
    single = merge_checkpoints("ties", variants, tmp_path / "single", base, progress=False)
    sharded = merge_checkpoints("ties", variants, tmp_path / "sharded", base, progress=False, max_shard_bytes=40_000)
    files = sorted(sharded.glob("*.safetensors"))
    assert len(files) > 2 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    expected = load_merged(single).state_dict()
    got = load_merged(sharded).state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_source_dtype_is_kept(tmp_path):
    base, variants = save_family(tmp_path / "bf16", dtype=torch.bfloat16, variants=2)
    out = merge_checkpoints("task-arithmetic", variants, tmp_path / "merged", base, scale=1.0, progress=False)
    merged = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    b, vs = probe(base), [probe(v) for v in variants]
    expected = (b.float() + sum(v.float() - b.float() for v in vs)).to(torch.bfloat16)
    torch.testing.assert_close(merged[PROBE], expected)


def test_tokenizer_and_generation_files_are_copied(family, tmp_path):
    base, variants = family
    source = tmp_path / "with_tokenizer"
    source.mkdir()
    for item in variants[0].iterdir():
        (source / item.name).write_bytes(item.read_bytes())
    (source / "tokenizer.json").write_text('{"fake": true}')
    (source / "chat_template.jinja").write_text("{{ messages }}")
    out = merge_checkpoints("average", [source, variants[1]], tmp_path / "merged", progress=False)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes()


def rewrite_checkpoint(source, target, edit):
    """Copies a checkpoint folder, passing its tensors through `edit(dict) -> dict`."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    save_file(edit(load_file(str(source / "model.safetensors"))), str(target / "model.safetensors"))
    return target


def test_missing_key_is_named(family, tmp_path):
    base, variants = family
    victim = "model.layers.0.block_sparse_moe.experts.3.w3.weight"
    broken = rewrite_checkpoint(variants[1], tmp_path / "broken", lambda s: {k: v for k, v in s.items() if k != victim})
    with pytest.raises(CheckpointError, match=rf"broken.*{victim}"):
        merge_checkpoints("average", [variants[0], broken], tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_extra_key_in_base_is_named(family, tmp_path):
    base, variants = family
    broken = rewrite_checkpoint(base, tmp_path / "broken_base", lambda s: {**s, "extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"broken_base.*extra\.weight"):
        merge_checkpoints("ties", variants, tmp_path / "merged", broken, progress=False)


def test_shape_mismatch_is_named(family, tmp_path):
    base, variants = family
    broken = rewrite_checkpoint(variants[2], tmp_path / "broken", lambda s: {**s, PROBE: s[PROBE][:-1]})
    with pytest.raises(CheckpointError, match=rf"broken.*{PROBE}.*shape"):
        merge_checkpoints("average", [variants[0], broken], tmp_path / "merged", progress=False)


def test_methods_that_need_a_base_say_so(family, tmp_path):
    _, variants = family
    for method in ("task-arithmetic", "ties", "dare"):
        with pytest.raises(ValueError, match=rf"'{method}' needs the base"):
            merge_checkpoints(method, variants, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_unknown_method_and_misplaced_options_are_rejected(family, tmp_path):
    base, variants = family
    with pytest.raises(ValueError, match="average, task-arithmetic, ties, dare"):
        merge_checkpoints("slerp", variants, tmp_path / "m", base)
    with pytest.raises(ValueError, match="does not take density"):
        merge_checkpoints("dare", variants, tmp_path / "m", base, density=0.5)
    with pytest.raises(ValueError, match="does not use a base"):
        merge_checkpoints("average", variants, tmp_path / "m", base)
    with pytest.raises(ValueError, match="drop_rate"):
        merge_checkpoints("dare", variants, tmp_path / "m", base, drop_rate=1.0)


def test_existing_output_is_left_alone(family, tmp_path):
    _, variants = family
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MoeplexError, match="already exists"):
        merge_checkpoints("average", variants, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_empty_output_folder_is_filled(family, tmp_path):
    _, variants = family
    out = tmp_path / "merged"
    out.mkdir()
    merge_checkpoints("average", variants, out, progress=False)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_failure_midway_leaves_no_output(family, tmp_path, monkeypatch):
    base, variants = family
    real_save = merge_module.save_file
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(*args, **kwargs)

    monkeypatch.setattr(merge_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        merge_checkpoints("ties", variants, tmp_path / "merged", base, progress=False, max_shard_bytes=40_000)
    assert len(calls) == 2, "the first shard should have been written before the failure"
    assert list(tmp_path.iterdir()) == []


def test_integer_tensors_are_copied_when_equal_and_rejected_when_not(tmp_path):
    def folder(name, ints):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text("{}")
        save_file({"w": torch.randn(3), "ids": ints}, str(path / "model.safetensors"))
        return path

    a, b = folder("a", torch.arange(4)), folder("b", torch.arange(4))
    out = merge_checkpoints("average", [a, b], tmp_path / "merged", progress=False)
    merged = load_file(str(out / "model.safetensors"))
    assert torch.equal(merged["ids"], torch.arange(4))
    c = folder("c", torch.arange(4) + 1)
    with pytest.raises(CheckpointError, match="'ids'"):
        merge_checkpoints("average", [a, c], tmp_path / "merged2", progress=False)
