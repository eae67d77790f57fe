"""Tests of the demo family: corpora, tokenizer, the cached atomic build, and (slow) the tiny family's quality."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoTokenizer, MixtralForCausalLM

from moeplex.demo import DEMO_SIZES, DOMAINS, build_demo_family, demo_root, load_demo_family
from moeplex.demo import build, corpora, perturb, recipes
from moeplex.demo.build import COMPLETE_MARKER, DemoFamilyMissingError
from moeplex.demo.recipes import BenchRecipe, ExpertChange, TinyRecipe, TokenizerRecipe
from moeplex.demo.tokenizer import save_tokenizer, train_tokenizer
from moeplex.demo.train import ModelDims, TrainingSchedule, mixtral_config

MICRO_DIMS = ModelDims(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    num_experts=4,
    experts_per_token=2,
    intermediate_size=48,
    max_position_embeddings=256,
)
MICRO_TOKENIZER = TokenizerRecipe(vocab_size=400, chars_per_domain=20_000)
MICRO_TINY = TinyRecipe(
    tokenizer=MICRO_TOKENIZER,
    dims=MICRO_DIMS,
    train_chars_per_domain=20_000,
    pretrain=TrainingSchedule(steps=3, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=1),
    fine_tune=TrainingSchedule(steps=2, batch_size=2, seq_len=32, lr=2e-4, warmup_steps=1),
    eval_tokens=128,
)
MICRO_BENCH = BenchRecipe(
    tokenizer=MICRO_TOKENIZER,
    dims=MICRO_DIMS,
    init_std=0.02,
    expert_changes=(
        ExpertChange(name="identical", fraction=0.5, relative_noise=0.0),
        ExpertChange(name="slight", fraction=0.25, relative_noise=0.02),
        ExpertChange(name="heavy", fraction=0.25, relative_noise=0.5),
    ),
    backbone_relative_noise=0.01,
    min_parameters=0,
)
SAMPLE_TEXTS = (
    'def greet(name: str) -> str:\n    return f"héllo, {name} ✓"\n',
    "template <typename T> inline T clamp(T x) { return x < 0 ? 0 : x; }  // 🙂",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test builds into its own cache folder."""
    monkeypatch.setenv("MOEPLEX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small_tokenizer():
    texts = [corpora.domain_text(domain, "train", 50_000) for domain in DOMAINS]
    return train_tokenizer(texts, vocab_size=1024)


@pytest.mark.parametrize("domain", DOMAINS)
def test_each_domain_has_disjoint_train_and_heldout_documents(domain):
    documents = corpora.domain_documents(domain)
    heldout_ids = {identity for identity, _ in documents if corpora.is_heldout(domain, identity)}
    train_ids = {identity for identity, _ in documents} - heldout_ids
    assert train_ids and heldout_ids
    train_texts = set(corpora.load_documents(domain, "train"))
    heldout_texts = set(corpora.load_documents(domain, "heldout"))
    assert train_texts and heldout_texts
    assert not train_texts & heldout_texts
    assert 0.03 < len(heldout_ids) / len(documents) < 0.25
    assert sum(map(len, train_texts)) <= corpora.MAX_DOMAIN_CHARS + corpora.MAX_DOC_CHARS


def test_split_is_a_stable_function_of_identity():
    identities = [f"pkg/module_{i}.py" for i in range(2000)]
    first = [corpora.is_heldout("python", i) for i in identities]
    assert first == [corpora.is_heldout("python", i) for i in identities]
    assert 0.08 < sum(first) / len(first) < 0.12


def test_domain_text_respects_max_chars():
    assert len(corpora.domain_text("prose", "train", 1000)) == 1000
    assert corpora.domain_text("prose", "train").startswith(corpora.load_documents("prose", "train")[0])


def test_unknown_or_empty_domain_raises_clearly(monkeypatch):
    with pytest.raises(ValueError, match="unknown demo domain"):
        corpora.load_documents("klingon", "train")
    monkeypatch.setitem(corpora.DOCUMENT_SOURCES, "empty", lambda: iter([]))
    with pytest.raises(corpora.EmptyCorpusError, match="no local text"):
        corpora.load_documents("empty", "train")


def test_tokenizer_round_trips_and_loads_with_auto_tokenizer(small_tokenizer, tmp_path):
    save_tokenizer(small_tokenizer, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).is_file()
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLE_TEXTS:
        ids = loaded(text)["input_ids"]
        assert ids[0] == loaded.bos_token_id
        assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")


def test_chat_template_marks_roles_and_generation_prompt(small_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = small_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = small_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert small_tokenizer.convert_tokens_to_ids("<|user|>") in ids
    assert ids.count(small_tokenizer.bos_token_id) == 1


def test_tokenizer_training_is_deterministic():
    texts = [corpora.domain_text(domain, "train", 10_000) for domain in DOMAINS]
    first = train_tokenizer(texts, vocab_size=300).backend_tokenizer.to_str()
    assert first == train_tokenizer(texts, vocab_size=300).backend_tokenizer.to_str()


def test_demo_root_follows_cache_environment(monkeypatch, tmp_path):
    assert demo_root("tiny", 3) == tmp_path / "cache" / "demo" / "tiny-seed3"
    monkeypatch.delenv("MOEPLEX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_root("bench") == tmp_path / "xdg" / "moeplex" / "demo" / "bench-seed0"
    with pytest.raises(ValueError, match="unknown demo size"):
        demo_root("huge")
    assert DEMO_SIZES == ("tiny", "bench")


def test_folder_without_marker_is_not_a_family():
    root = demo_root("tiny")
    root.mkdir(parents=True)
    build.write_spec(root, "tiny")
    record = recipes.recipe_record("tiny", 0, recipes.recipe_for("tiny"))
    assert not build.is_complete(root, recipes.recipe_hash(record))
    with pytest.raises(DemoFamilyMissingError, match="moeplex demo build"):
        load_demo_family("tiny")
    (root / COMPLETE_MARKER).write_text(json.dumps({"recipe_hash": "from-an-old-recipe"}))
    with pytest.raises(DemoFamilyMissingError, match="another recipe"):
        load_demo_family("tiny")


def test_publish_replaces_an_existing_folder(tmp_path):
    root, staging = tmp_path / "family", tmp_path / "staging"
    root.mkdir()
    (root / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    build.publish(staging, root)
    assert sorted(p.name for p in root.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["family"]


def test_failed_build_leaves_nothing_at_the_final_path(monkeypatch):
    def crash(folder, size, seed, record):
        (folder / "half-written.safetensors").write_bytes(b"x")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build, "build_into", crash)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_demo_family("tiny")
    root = demo_root("tiny")
    assert not root.exists()
    assert [p.name for p in root.parent.iterdir()] == [f".{root.name}.lock"]


def test_leftovers_of_a_killed_build_are_removed_by_the_next(monkeypatch):
    root = demo_root("tiny")
    leftover = root.parent / f".{root.name}.building-abc123"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    monkeypatch.setitem(recipes.RECIPES, "tiny", MICRO_TINY)
    build_demo_family("tiny")
    assert not leftover.exists()
    assert sorted(p.name for p in root.parent.iterdir()) == [f".{root.name}.lock", root.name]


def test_micro_tiny_build_is_complete_loadable_and_idempotent(monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "tiny", MICRO_TINY)
    family = build_demo_family("tiny")
    assert family.root == demo_root("tiny")
    assert set(family.variants) == {"python", "cpp", "prose", "licenses"}
    assert family.own_domain == {name: name for name in family.variants}
    spec = yaml.safe_load(family.spec_file.read_text())
    assert spec["name"] == "demo-tiny" and spec["base"] == "base"
    for folder in (family.base, *family.variants.values()):
        for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
            assert (folder / name).is_file()
        with safe_open(folder / "model.safetensors", framework="pt") as weights:
            assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in weights.keys()
        model = MixtralForCausalLM.from_pretrained(folder)
        assert model.config.num_local_experts == 4
    report = json.loads((family.root / build.RECIPE_FILE).read_text())["report"]
    assert set(report["heldout_perplexity"]) == set(family.variants)

    monkeypatch.setattr(build, "build_into", pytest.fail)
    assert build_demo_family("tiny") == family
    assert load_demo_family("tiny") == family


def test_micro_tiny_build_is_deterministic(monkeypatch, tmp_path):
    monkeypatch.setitem(recipes.RECIPES, "tiny", MICRO_TINY)
    first = (build_demo_family("tiny").variants["cpp"] / "model.safetensors").read_bytes()
    second = (build_demo_family("tiny", force=True).variants["cpp"] / "model.safetensors").read_bytes()
    assert first == second


def test_micro_bench_variants_perturb_experts_as_recorded(monkeypatch):
    monkeypatch.setitem(recipes.RECIPES, "bench", MICRO_BENCH)
    family = build_demo_family("bench")
    changes = json.loads((family.root / build.RECIPE_FILE).read_text())["report"]["expert_changes"]
    base = safe_open(family.base / "model.safetensors", framework="pt")
    assert base.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    for name, variant_dir in family.variants.items():
        variant = safe_open(variant_dir / "model.safetensors", framework="pt")
        assert sum(len(p) for p in changes[name].values()) == MICRO_DIMS.num_layers * MICRO_DIMS.num_experts
        for change in MICRO_BENCH.expert_changes:
            for layer, expert in changes[name][change.name]:
                key = f"model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight"
                a, b = base.get_tensor(key).float(), variant.get_tensor(key).float()
                relative = ((b - a).norm() / a.norm()).item()
                if change.relative_noise == 0:
                    assert torch.equal(a, b)
                else:
                    assert relative == pytest.approx(change.relative_noise, rel=0.2, abs=0.005)
        a, b = (t.get_tensor("model.layers.0.self_attn.q_proj.weight").float() for t in (base, variant))
        assert 0 < ((b - a).norm() / a.norm()).item() < 0.05
        assert MixtralForCausalLM.from_pretrained(variant_dir).dtype == torch.bfloat16


def test_bench_recipe_models_have_at_least_300m_parameters(small_tokenizer):
    config = mixtral_config(recipes.BENCH_RECIPE.dims, small_tokenizer)
    assert perturb.parameter_count(config) >= 300_000_000


def heldout_perplexity(model, tokenizer, domain: str, seq_len: int = 256, max_windows: int = 48) -> float:
    """Perplexity with transformers' own loss over non-overlapping windows spread over a domain's heldout text."""
    ids = []
    for document in corpora.load_documents(domain, "heldout"):
        ids += tokenizer(document)["input_ids"] + [tokenizer.eos_token_id]
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    windows = windows[torch.linspace(0, len(windows) - 1, min(len(windows), max_windows)).round().long()]
    with torch.inference_mode():
        losses = [model(input_ids=batch, labels=batch).loss.item() for batch in windows.split(1)]
    return math.exp(sum(losses) / len(losses))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # builds the family from scratch: ~4 min on a quiet 2-core machine, 15 min seen when busy
def test_tiny_family_variants_beat_base_on_their_own_heldout_domain():
    family = build_demo_family("tiny")
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    base = MixtralForCausalLM.from_pretrained(family.base)
    for name, folder in family.variants.items():
        domain = family.own_domain[name]
        variant = MixtralForCausalLM.from_pretrained(folder)
        base_ppl = heldout_perplexity(base, tokenizer, domain)
        variant_ppl = heldout_perplexity(variant, tokenizer, domain)
        assert variant_ppl <= 0.85 * base_ppl, f"{name}: variant ppl {variant_ppl:.1f} vs base {base_ppl:.1f}"
