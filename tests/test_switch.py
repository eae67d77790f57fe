"""Switch Transformers (encoder-decoder): consolidation, store, export and quality report, checked in transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from moeplex.cli import main
from moeplex.consolidate.analysis import analyse_family
from moeplex.consolidate.family_spec import FamilySpecError, load_family_spec
from moeplex.consolidate.plan import identity_plan
from moeplex.consolidate.switch_models import consolidated_switch
from moeplex.demo.corpora import DOMAINS, domain_text
from moeplex.demo.tokenizer import save_tokenizer, train_tokenizer
from moeplex.engine import Engine
from moeplex.errors import UnsupportedModelError
from moeplex.store import StoreReader, export_variant, verify_store, write_store
from moeplex.store.materialize import materialize_expert
from tests.test_engine_store import one_torch_thread  # noqa: F401 (autouse: Switch's index_add_ stalls with 2 threads)

# Encoder block 1 and both decoder blocks are sparse: positions (layer, expert) for layers 1, 2, 3.
SPARSE_LAYERS = (1, 2, 3)
NUM_EXPERTS = 4
# variant -> noise scale per expert index; 0 leaves the expert byte-identical to the base's.
NOISE = {"alpha": [0, 0.01, 0.3, 0.0], "beta": [0, 0.02, 0.0, 0.3], "gamma": [0, 0.3, 0.2, 0.01]}
OWN_DOMAIN = {"alpha": "python", "beta": "cpp", "gamma": "prose"}


def switch_config(vocab_size: int, d_ff: int = 48) -> transformers.SwitchTransformersConfig:
    return transformers.SwitchTransformersConfig(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=d_ff, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=2, num_experts=NUM_EXPERTS, expert_capacity=1024,
        router_jitter_noise=0.0,
    )


def switch_model(config, seed: int) -> transformers.SwitchTransformersForConditionalGeneration:
    torch.manual_seed(seed)
    return transformers.SwitchTransformersForConditionalGeneration(config).eval()


def perturb(model, scales: list[float], seed: int) -> None:
    """Noise on each expert index's wi/wo (relative to the weight's scale) and a little on self-attention."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts.expert_" in name:
                scale = scales[int(name.split(".experts.expert_")[1].split(".")[0])]
                if scale:
                    param += scale * param.std() * torch.randn(param.shape, generator=generator)
            elif "SelfAttention.q" in name:
                param += 0.01 * torch.randn(param.shape, generator=generator)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([domain_text(d, "train", 20_000) for d in DOMAINS], vocab_size=300)


@pytest.fixture(scope="module")
def family_yaml(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("switch_family")
    config = switch_config(len(tokenizer))
    for name, seed in [("base", 0), *[(v, i) for i, v in enumerate(NOISE, start=1)]]:
        model = switch_model(config, seed=7)
        if name != "base":
            perturb(model, NOISE[name], seed)
        model.save_pretrained(root / name)
        save_tokenizer(tokenizer, root / name)
    spec = {"name": "switch-synthetic", "base": "base", "variants": {v: v for v in NOISE}, "own_domain": OWN_DOMAIN}
    (root / "family.yaml").write_text(yaml.safe_dump(spec))
    return root / "family.yaml"


@pytest.fixture(scope="module")
def family(family_yaml):
    return load_family_spec(family_yaml)


@pytest.fixture(scope="module")
def analysis(family, tokenizer):
    calibration = torch.randint(0, len(tokenizer), (600,), generator=torch.Generator().manual_seed(0))
    return analyse_family(family, calibration=calibration, progress=False)


def random_inputs(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, vocab_size, (2, 11), generator=generator),
        "decoder_input_ids": torch.randint(2, vocab_size, (2, 7), generator=generator),
    }


def logits_of(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs).logits


def load(folder):
    return transformers.SwitchTransformersForConditionalGeneration.from_pretrained(folder).eval()


def test_expert_positions_span_encoder_and_decoder(analysis):
    assert analysis.shape.sparse_layers == SPARSE_LAYERS
    assert analysis.shape.num_layers == 4 and analysis.shape.num_experts == NUM_EXPERTS
    assert set(analysis.experts.read(("alpha", 1, 0))) == {"wi", "wo"}
    names = analysis.distances.names
    for layer in SPARSE_LAYERS:
        assert float(analysis.distances.l2[(layer, 0)].max()) == 0.0  # expert 0 untouched everywhere
        near = analysis.distances.l2[(layer, 1)][names.index("alpha"), names.index("base")]
        far = analysis.distances.l2[(layer, 2)][names.index("alpha"), names.index("base")]
        assert far > near > 0
        assert sum(analysis.errors.frequency("alpha", layer, e) for e in range(NUM_EXPERTS)) == pytest.approx(1.0)
    assert analysis.errors.inputs["alpha"].inputs[(2, 0)].shape[1] == 32
    sizes = analysis.sizes
    assert sizes.expert == 2 * 32 * 48 * 4  # wi + wo in float32
    assert sizes.backbone == sizes.one_model - 3 * NUM_EXPERTS * sizes.expert


def test_mismatched_variant_names_variant_and_field_or_tensor(family_yaml, tokenizer, tmp_path):
    wider = switch_model(switch_config(len(tokenizer), d_ff=64), seed=7)
    wider.save_pretrained(tmp_path / "wide")
    spec = yaml.safe_load(family_yaml.read_text())
    spec["variants"] = {v: str(family_yaml.parent / v) for v in NOISE} | {"wide": str(tmp_path / "wide")}
    spec["base"] = str(family_yaml.parent / "base")
    (tmp_path / "family.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(FamilySpecError, match="variant 'wide'.*d_ff=64"):
        load_family_spec(tmp_path / "family.yaml")
    # The config claims the family's d_ff, the weights do not: the error names the tensor.
    config_path = tmp_path / "wide" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"d_ff": 48}))
    with pytest.raises(FamilySpecError, match=r"variant 'wide'.*encoder\.block\.0\.layer\.1\.mlp\.wi\.weight"):
        load_family_spec(tmp_path / "family.yaml")


def test_store_without_sharing_exports_the_original_variant(family, analysis, tmp_path):
    plan = identity_plan(tuple(NOISE), 4, NUM_EXPERTS, SPARSE_LAYERS)
    write_store(family, plan, tmp_path / "store", progress=False)
    assert verify_store(tmp_path / "store") == []
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["architecture"] == "switch_transformers"
    # Expert 0 is byte-identical in every variant: stored once per layer.
    assert len(manifest["experts"]) == len(NOISE) * len(SPARSE_LAYERS) * NUM_EXPERTS - 2 * len(SPARSE_LAYERS)
    inputs = random_inputs(family_vocab(analysis), seed=1)
    for variant in ("alpha", "gamma"):
        exported = export_variant(tmp_path / "store", variant, tmp_path / f"export_{variant}")
        original = load(family.variants[variant])
        assert torch.equal(logits_of(load(exported), inputs), logits_of(original, inputs))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        StoreReader(tmp_path / "store").load_variant_models(["alpha"], torch.float32)
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        Engine(tmp_path / "store")


@pytest.mark.parametrize("method", ["quality-aware", "l2-roundrobin"])
def test_consolidated_export_carries_the_planned_experts(family, analysis, method, tmp_path):
    sizes = analysis.sizes
    plan = analysis.plan(method, (sizes.smallest + sizes.unshared) // 2)
    shared = [g for g in set(plan.assignment.values()) if list(plan.assignment.values()).count(g) > 1]
    assert shared and plan.num_stored_experts < sizes.positions_per_variant * len(NOISE)
    write_store(family, plan, tmp_path / "store", progress=False)
    assert verify_store(tmp_path / "store") == []
    inputs = random_inputs(family_vocab(analysis), seed=2)
    for variant in NOISE:
        exported = export_variant(tmp_path / "store", variant, tmp_path / f"export_{variant}")
        weights = load_file(exported / "model.safetensors")
        for (owner, layer, expert), group in plan.assignment.items():
            if owner != variant:
                continue
            planned = materialize_expert(plan.groups[group], analysis.experts.read)
            stack, block = ("encoder", layer) if layer < 2 else ("decoder", layer - 2)
            prefix = f"{stack}.block.{block}.layer.{1 if stack == 'encoder' else 2}.mlp.experts.expert_{expert}"
            assert torch.equal(weights[f"{prefix}.wi.weight"], planned["wi"])
            assert torch.equal(weights[f"{prefix}.wo.weight"], planned["wo"])
        in_memory = consolidated_switch(plan, variant, analysis.experts)
        torch.testing.assert_close(logits_of(load(exported), inputs), logits_of(in_memory, inputs), rtol=0, atol=0)


def test_cli_consolidates_and_reports_a_switch_family(family_yaml, tmp_path):
    store, report_dir = tmp_path / "store", tmp_path / "report"
    argv = ["consolidate", str(family_yaml), "--budget", "2.5x", "--out", str(store), "--report",
            "--report-dir", str(report_dir), "--max-tokens", "96", "--json", str(tmp_path / "summary.json")]
    assert main(argv) == 0
    assert main(["verify", str(store)]) == 0
    positions = len(SPARSE_LAYERS) * NUM_EXPERTS  # the budget is between every position shared and none
    assert positions < json.loads((tmp_path / "summary.json").read_text())["stored_experts"] < positions * len(NOISE)
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["tables"]) == set(NOISE)
    systems = {"original", "quality-aware", "l2-roundrobin", "average", "task-arithmetic", "ties", "dare"}
    for rows in report["tables"].values():
        assert set(rows) == systems
        for row in rows.values():
            assert all(math.isfinite(row["ppl"][d]) and row["ppl"][d] > 1 for d in DOMAINS)
            assert math.isfinite(row["kl"]) and 0 <= row["greedy_agreement"] <= 1
        assert rows["original"]["kl"] == pytest.approx(0.0, abs=1e-6) and rows["original"]["greedy_agreement"] == 1.0
    assert all(math.isfinite(v) for values in report["sweep"]["mean_ppl_increase"].values() for v in values)
    text = (report_dir / "report.md").read_text()
    assert "decoder predicts" in text and "| original |" in text
    assert (report_dir / "quality_vs_budget.png").stat().st_size > 0
    assert len(list(report_dir.glob("similarity_*.png"))) == 3


def family_vocab(analysis) -> int:
    return analysis.experts.spec("alpha").vocab_size
