"""The store: round trips against the source checkpoints, deduplication, export, damage and atomic writes."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import transformers
import yaml

from moeplex.consolidate.family_spec import load_family_spec
from moeplex.consolidate.plan import ExpertSource, identity_plan
from moeplex.model.attention import SequenceChunk
from moeplex.model.runtime import MoEModel, load_model
from moeplex.model.weights import open_checkpoint
from moeplex.store import SCHEMA_VERSION, StoreError, StoreReader, export_variant, verify_store, write_store
from moeplex.store import writer as store_writer
from moeplex.store.manifest import read_manifest
from tests.conftest import family_configs, make_hf_model

# Which (layer, expert) each variant fine-tunes; every other expert stays byte-identical to the base.
TUNED = {"python": [(0, 1), (2, 3)], "cpp": [(0, 1), (2, 0)]}
TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 64}'}


def build_family(root, family: str):
    """A base checkpoint and one variant per TUNED entry (some experts and q of layer 0 perturbed), with a YAML."""
    make_hf_model(family_configs()[family], seed=7).save_pretrained(root / "base")
    for name, content in TOKENIZER_FILES.items():
        (root / "base" / name).write_text(content)
    for seed, (variant, positions) in enumerate(TUNED.items(), start=1):
        model = make_hf_model(family_configs()[family], seed=7)
        perturb(model, positions, seed)
        model.save_pretrained(root / variant)
    data = {"name": f"tiny-{family}", "base": "base", "variants": {v: v for v in TUNED}}
    (root / "family.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_family_spec(root / "family.yaml")


def perturb(model, positions, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())

    def nudge(tensor):
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))

    with torch.no_grad():
        for layer, expert in positions:
            for proj in ("gate_up_proj", "down_proj"):
                nudge(params[f"model.layers.{layer}.mlp.experts.{proj}"][expert])
        nudge(params["model.layers.0.self_attn.q_proj.weight"])


def identity_plan_of(family):
    """Every position of every checkpoint (base included) keeps its own expert."""
    spec = open_checkpoint(family.base)[2]
    sparse = tuple(layer for layer, is_sparse in enumerate(spec.sparse_layers) if is_sparse)
    return identity_plan(tuple(family.checkpoints()), spec.num_layers, spec.num_experts, sparse)


def logits(model: MoEModel, prompt: torch.Tensor) -> torch.Tensor:
    return model.forward(prompt, [SequenceChunk(model.new_cache(), 0, len(prompt))], all_logits=True)


def random_prompt(length: int = 12) -> torch.Tensor:
    return torch.randint(0, family_configs()["mixtral"].vocab_size, (length,))


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def family(request, tmp_path_factory):
    return build_family(tmp_path_factory.mktemp(f"family_{request.param}"), request.param)


@pytest.fixture(scope="module")
def mixtral_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("family_mixtral_small"), "mixtral")


@pytest.fixture(scope="module")
def pristine_store(mixtral_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "store"
    return write_store(mixtral_family, identity_plan_of(mixtral_family), out, progress=False)


@pytest.fixture
def store(pristine_store, tmp_path):
    """A fresh copy of a sound store that a test may damage."""
    return shutil.copytree(pristine_store, tmp_path / "store")


def test_identity_store_reproduces_every_checkpoint_exactly(family, tmp_path):
    out = write_store(family, identity_plan_of(family), tmp_path / "store", progress=False)
    reader = StoreReader(out)
    models = reader.load_variant_models(reader.variants, torch.float32)
    prompt = random_prompt()
    for variant, folder in family.checkpoints().items():
        expected = logits(load_model(folder, dtype=torch.float32), prompt)
        assert torch.equal(logits(models[variant], prompt), expected), variant
    banks = {id(model.experts.bank) for model in models.values()}
    assert len(banks) == 1, "variants loaded together share one expert bank"
    assert verify_store(out) == []


def test_identical_experts_are_stored_once(mixtral_family, pristine_store):
    reader = StoreReader(pristine_store)
    spec = reader.spec("base")
    base_experts = spec.num_layers * spec.num_experts
    tuned = sum(len(positions) for positions in TUNED.values())
    assert len(reader.manifest.experts) == base_experts + tuned
    assert len(list((pristine_store / "experts").iterdir())) == base_experts + tuned
    base, python = reader.expert_table("base"), reader.expert_table("python")
    assert python[1][0] == base[1][0] and python[0][1] != base[0][1]
    assert reader.manifest.plan["method"] == "none" and reader.manifest.plan["variants"] == ["base", *TUNED]


def test_manifest_describes_sources_bytes_and_dtypes(mixtral_family, pristine_store):
    manifest = json.loads((pristine_store / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert (manifest["family"], manifest["architecture"], manifest["hf_architecture"]) == (
        "tiny-mixtral", "mixtral", "MixtralForCausalLM",
    )
    assert set(manifest["sources"]) == {"base", *TUNED}
    assert manifest["base"] == "base"
    assert all(len(source["fingerprint"]) == 64 for source in manifest["sources"].values())
    counts = manifest["bytes"]
    assert counts["store_total"] < counts["sources_total"] == 3 * counts["one_model"]
    assert counts["experts"] == sum(e["bytes"] for e in manifest["experts"].values())
    assert manifest["dtypes"] == {"experts": ["float32"], "backbones": ["float32"]}
    assert set(manifest["tokenizer"]) == set(TOKENIZER_FILES)
    assert all(row is not None and len(row) == 6 for row in manifest["expert_tables"]["cpp"])


def test_dense_layers_have_no_table_row(family, tmp_path):
    reader = StoreReader(write_store(family, identity_plan_of(family), tmp_path / "store", progress=False))
    spec = reader.spec("base")
    assert [row is not None for row in reader.expert_table("python")] == list(spec.sparse_layers)


def shared_plan(family):
    """Identity, except that python's and cpp's expert (0, 1) become one expert: their average."""
    plan = identity_plan_of(family)
    plan.groups["merged/0/1"] = ExpertSource((("python", 0, 1), ("cpp", 0, 1)), (0.5, 0.5))
    plan.assignment[("python", 0, 1)] = plan.assignment[("cpp", 0, 1)] = "merged/0/1"
    plan.method = "test-merge"
    return plan


def test_shared_expert_is_the_average_and_export_loads_in_transformers(family, tmp_path):
    reader = StoreReader(write_store(family, shared_plan(family), tmp_path / "store", progress=False))
    merged_id = reader.expert_table("python")[0][1]
    assert reader.expert_table("cpp")[0][1] == merged_id
    python, cpp = (open_checkpoint(family.variants[v]) for v in ("python", "cpp"))
    sources = [f.read_expert(r, s, 0, 1) for f, r, s in (python, cpp)]
    merged = reader.read_expert(merged_id)
    for part in ("gate_up", "down"):
        torch.testing.assert_close(merged[part], 0.5 * sources[0][part] + 0.5 * sources[1][part], rtol=0, atol=1e-7)

    export_variant(reader, "python", tmp_path / "exported")
    assert (tmp_path / "exported" / "tokenizer.json").read_text() == TOKENIZER_FILES["tokenizer.json"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    prompt = random_prompt()
    with torch.no_grad():
        reference = hf_model(prompt[None]).logits[0]
    ours = logits(reader.load_variant_model("python", torch.float32), prompt)
    assert float((ours - reference).abs().max() / reference.abs().max()) <= 1e-5


def test_bfloat16_store_casts_every_tensor(mixtral_family, tmp_path):
    plan = shared_plan(mixtral_family)
    out = write_store(mixtral_family, plan, tmp_path / "store", dtype=torch.bfloat16, progress=False)
    reader = StoreReader(out)
    assert reader.manifest.dtypes == {"experts": ["bfloat16"], "backbones": ["bfloat16"]}
    assert reader.read_expert(reader.expert_table("cpp")[2][0])["down"].dtype == torch.bfloat16
    prompt = random_prompt()
    expected = logits(load_model(mixtral_family.base, dtype=torch.bfloat16), prompt)
    assert torch.equal(logits(reader.load_variant_model("base", torch.bfloat16), prompt), expected)


def flip_bytes(path, offset_from_end: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_expert_is_reported_and_refused(store):
    reader = StoreReader(store)
    expert_id = reader.expert_table("python")[0][1]
    flip_bytes(store / "experts" / f"{expert_id}.safetensors")
    problems = verify_store(store)
    assert len(problems) == 1 and expert_id in problems[0] and "corrupt" in problems[0]
    with pytest.raises(StoreError, match=rf"expert {expert_id}: file .*{expert_id}\.safetensors is corrupt"):
        reader.read_expert(expert_id)
    with pytest.raises(StoreError, match=expert_id):
        reader.load_variant_model("python", torch.float32)
    reader.load_variant_model("base", torch.float32)  # other variants do not use that blob


def test_missing_expert_is_reported_and_refused(store):
    reader = StoreReader(store)
    expert_id = reader.expert_table("cpp")[2][0]
    (store / "experts" / f"{expert_id}.safetensors").unlink()
    assert any(expert_id in p and "missing" in p for p in verify_store(store))
    with pytest.raises(StoreError, match=rf"expert {expert_id}: file .* is missing"):
        reader.read_expert(expert_id)


def test_corrupt_backbone_and_config_are_refused(store):
    flip_bytes(store / "backbones" / "cpp.safetensors")
    with pytest.raises(StoreError, match=r"backbone of 'cpp'.*corrupt"):
        StoreReader(store).load_backbone("cpp", torch.float32)
    flip_bytes(store / "configs" / "python" / "config.json", offset_from_end=3)
    with pytest.raises(StoreError, match=r"config.json of 'python'.*corrupt"):
        StoreReader(store).spec("python")
    assert len(verify_store(store)) == 2


def test_verify_finds_dangling_unused_and_unlisted_experts(store):
    manifest = json.loads((store / "manifest.json").read_text())
    table = manifest["expert_tables"]["base"]
    orphan = table[0][1]  # both variants tuned expert (0, 1): only base uses this blob
    table[0][1] = "0" * 64
    (store / "experts" / "stray.safetensors").write_bytes(b"x")
    (store / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_store(store)
    assert any("layer 0 expert 1: id 000" in p for p in problems)
    assert any(orphan in p and "no variant's table uses it" in p for p in problems)
    assert any("stray.safetensors" in p for p in problems)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text[: len(text) // 2], r"manifest\.json: truncated or not valid JSON"),
        (
            lambda text: text.replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 99'),
            "schema_version 99 is not supported",
        ),
        (
            lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "experts"}),
            "field 'experts' is missing",
        ),
        (lambda text: json.dumps(json.loads(text) | {"base": 7}), "field 'base' is missing or not a str"),
        (lambda text: json.dumps(json.loads(text) | {"own_domain": {"nope": "prose"}}), "field 'own_domain' maps 'nope'"),
    ],
)
def test_damaged_manifest_is_a_clear_error(store, damage, message):
    path = store / "manifest.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(StoreError, match=message):
        StoreReader(store)
    problems = verify_store(store)
    assert len(problems) == 1 and "manifest.json" in problems[0]


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="store not found"):
        StoreReader(tmp_path / "nothing")
    with pytest.raises(StoreError, match="no manifest.json"):
        StoreReader(tmp_path)


def test_unknown_variant_and_expert_id(store):
    reader = StoreReader(store)
    with pytest.raises(StoreError, match="no variant 'rust'"):
        reader.expert_table("rust")
    with pytest.raises(StoreError, match="expert id abc is not in the store"):
        reader.read_expert("abc")


def test_killed_write_leaves_nothing_behind(mixtral_family, tmp_path, monkeypatch):
    written = []

    def materialize_then_die(*args):
        if len(written) == 5:
            raise KeyboardInterrupt("killed")
        written.append(args)
        return real_materialize(*args)

    real_materialize = store_writer.materialize_expert
    monkeypatch.setattr(store_writer, "materialize_expert", materialize_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_store(mixtral_family, identity_plan_of(mixtral_family), tmp_path / "store", progress=False)
    assert len(written) == 5
    assert list(tmp_path.iterdir()) == []


def test_existing_store_is_kept_unless_overwrite(mixtral_family, pristine_store, tmp_path):
    out = shutil.copytree(pristine_store, tmp_path / "store")
    with pytest.raises(StoreError, match="already exists"):
        write_store(mixtral_family, shared_plan(mixtral_family), out, progress=False)
    assert StoreReader(out).manifest.plan["method"] == "none"
    write_store(mixtral_family, shared_plan(mixtral_family), out, progress=False, overwrite=True)
    assert StoreReader(out).manifest.plan["method"] == "test-merge"
    assert verify_store(out) == [] and [p.name for p in tmp_path.iterdir()] == ["store"]


def test_plan_for_another_shape_is_refused(mixtral_family, tmp_path):
    plan = identity_plan(("base",), 3, 4, (0, 1, 2))
    with pytest.raises(StoreError, match=r"\(layers, experts, sparse layers\)"):
        write_store(mixtral_family, plan, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


def test_manifest_without_base_field_reads_as_no_base(store):
    """Stores written before the field existed have no base: their variants are served without a parent."""
    path = store / "manifest.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "base"}))
    assert StoreReader(store).base is None
    assert StoreReader(store).variants


def test_manifest_records_each_variants_own_domain(mixtral_family, tmp_path):
    """From the family YAML's own_domain; stores written before the field existed read it as empty."""
    tuned = [v for v in mixtral_family.variants if v != "base"][:1]
    family = dataclasses.replace(mixtral_family, own_domain=dict.fromkeys(tuned, "prose"))
    store = write_store(family, identity_plan_of(family), tmp_path / "store", progress=False)
    assert read_manifest(store).own_domain == dict.fromkeys(tuned, "prose")
    path = store / "manifest.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "own_domain"}))
    assert read_manifest(store).own_domain == {}
