"""Variant-batched backbones: fully fine-tuned variants mixed in one step give each variant's own tokens, in every family."""

from __future__ import annotations

import pytest
import torch
import yaml

from moeplex.consolidate.family_spec import load_family_spec
from moeplex.engine import Engine, EngineConfig
from moeplex.engine.step_weights import StepWeights, VariantStacks
from moeplex.model.attention import AttentionWeights
from moeplex.model.grouped import GroupedWeight
from moeplex.model.weights import Backbone, LayerWeights
from moeplex.store import StoreReader
from moeplex.store.writer import write_store
from tests.conftest import family_configs, make_hf_model
from tests.test_engine import alone, make_requests, run_engine
from tests.test_engine_store import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.test_store import identity_plan_of

VARIANTS = ("base", "python", "cpp")


def fully_tuned_store(root, family: str):
    """A store of three variants whose every backbone tensor differs (norms, embeddings and lm_head included)."""
    config = family_configs()[family]
    for seed, variant in enumerate(VARIANTS):
        model = make_hf_model(config, seed=7)
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".experts." not in name:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / variant)
    data = {"name": f"tuned-{family}", "base": "base", "variants": {v: v for v in VARIANTS[1:]}}
    (root / "family.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    family_spec = load_family_spec(root / "family.yaml")
    return write_store(family_spec, identity_plan_of(family_spec), root / "store", progress=False)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def tuned_store(request, tmp_path_factory):
    return fully_tuned_store(tmp_path_factory.mktemp(f"tuned_{request.param}"), request.param)


def test_stacked_backbones_mix_fully_tuned_variants(tuned_store):
    engine = Engine(tuned_store, EngineConfig(dtype=torch.float32, max_num_batched_tokens=24, max_num_seqs=8))
    stacks = engine.runner.step_weights.stacks
    assert stacks is not None and {"embed", "final_norm", "lm_head", "layers.0.attention.qkv", "layers.0.attn_norm"} <= set(stacks.stacks)
    for slot, variant in enumerate(VARIANTS):
        backbone = engine.backbones.resident[variant]
        assert backbone.layers[0].attention.qkv.data_ptr() == stacks.stacks["layers.0.attention.qkv"][slot].data_ptr(), "the stack is the only copy"
    widths = []
    forward = engine.runner.forward
    engine.runner.forward = lambda groups: widths.append(len(groups)) or forward(groups)
    requests = make_requests(tuned_store, per_variant=2, seed=3)
    assert run_engine(engine, requests, join_after=2) == alone(tuned_store, requests)
    assert max(widths) == len(VARIANTS), "steps mixed every variant"


def test_unstacked_backbones_mix_variants_under_a_backbone_budget(tuned_store):
    two = 2 * StoreReader(tuned_store).load_backbone("base", torch.float32).nbytes
    engine = Engine(tuned_store, EngineConfig(dtype=torch.float32, backbone_budget_bytes=two, max_num_seqs=8))
    assert engine.backbones.capacity == 2 and engine.runner.step_weights.stacks is None
    requests = make_requests(tuned_store, per_variant=2, seed=4)
    assert run_engine(engine, requests) == alone(tuned_store, requests)
    engine.close()


def tiny_backbone(seed: int, tied: bool) -> Backbone:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    embed = rand(10, 4)
    layer = LayerWeights(attn_norm=rand(4), mlp_norm=rand(4), attention=AttentionWeights(qkv=rand(12, 4), o=rand(4, 4)), router=rand(3, 4))
    return Backbone(embed=embed, final_norm=rand(4), lm_head=embed if tied else rand(10, 4), layers=[layer])


def test_tied_embeddings_are_stacked_once_and_shared_tensors_not_at_all():
    backbones = {name: tiny_backbone(seed, tied=True) for seed, name in enumerate("abc")}
    shared_router = backbones["a"].layers[0].router
    for backbone in backbones.values():
        backbone.layers[0].router = shared_router
    originals = {name: b.embed.clone() for name, b in backbones.items()}
    stacks = VariantStacks(backbones)
    assert "layers.0.router" not in stacks.stacks and backbones["c"].layers[0].router is shared_router
    assert stacks.stacks["embed"] is stacks.stacks["lm_head"]
    for name, backbone in backbones.items():
        assert torch.equal(backbone.embed, originals[name]) and backbone.lm_head.data_ptr() == backbone.embed.data_ptr()
    one = 10 * 4 * 4
    assert stacks.nbytes == 3 * (one + (4 + 4 + 48 + 16 + 4) * 4), "embed/lm_head once, router not stacked"


@pytest.mark.parametrize("stacked", [True, False])
def test_step_weights_give_each_row_its_variants_weights(stacked):
    backbones = {name: tiny_backbone(seed, tied=False) for seed, name in enumerate("abc")}
    spec = type("Spec", (), {"num_layers": 1, "qk_norm": None})()
    weights = StepWeights(spec, VariantStacks(backbones) if stacked else None)
    variants = weights.ordered(["c", "a"])
    assert variants == (["a", "c"] if stacked else ["c", "a"])
    sizes, heads = {"a": 3, "c": 2}, {"a": 1, "c": 2}
    token_ids = torch.randint(0, 10, (5,))
    step = weights.build(variants, [backbones[v] for v in variants], [sizes[v] for v in variants], [heads[v] for v in variants], token_ids)
    rows = [v for v in variants for _ in range(sizes[v])]
    expected_embed = torch.stack([backbones[v].embed[t] for v, t in zip(rows, token_ids.tolist())])
    assert torch.equal(step.embedded, expected_embed)
    layer = step.layers[0]
    assert torch.equal(layer.attn_norm, torch.stack([backbones[v].layers[0].attn_norm for v in rows]))
    assert isinstance(layer.attention.qkv, GroupedWeight) and layer.attention.qkv.offsets.tolist()[-1] == 5
    head_rows = [v for v in variants for _ in range(heads[v])]
    assert torch.equal(step.final_norm, torch.stack([backbones[v].final_norm for v in head_rows]))
