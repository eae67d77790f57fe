"""Consolidation end to end on a small random family: analysis, plans under budgets, store equivalence."""

from __future__ import annotations

import pytest
import torch
import yaml

from moeplex.consolidate.analysis import analyse_family, parse_budget
from moeplex.consolidate.family_spec import load_family_spec
from moeplex.consolidate.variant_models import consolidated_model
from moeplex.errors import MoeplexError
from moeplex.model.attention import SequenceChunk
from moeplex.store import StoreReader, verify_store, write_store
from tests.conftest import family_configs, make_hf_model

# variant -> (noise scale per expert index); 0 leaves the expert byte-identical to the base.
NOISE = {"alpha": [0, 0.01, 0.2, 0.0, 0.05, 0.3], "beta": [0, 0.02, 0.0, 0.3, 0.05, 0.01], "gamma": [0, 0.3, 0.2, 0.01, 0.0, 0.1]}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    config = family_configs()["mixtral"]
    make_hf_model(config, seed=3).save_pretrained(root / "base")
    for seed, (variant, scales) in enumerate(NOISE.items(), start=1):
        model = make_hf_model(config, seed=3)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "experts" in name:
                    for expert, scale in enumerate(scales):
                        param[expert] += scale * torch.randn(param[expert].shape, generator=generator)
                elif "self_attn" in name:
                    param += 0.01 * torch.randn(param.shape, generator=generator)
        model.save_pretrained(root / variant)
    spec = {"name": "synthetic", "base": "base", "variants": {v: v for v in NOISE}}
    (root / "family.yaml").write_text(yaml.safe_dump(spec))
    return load_family_spec(root / "family.yaml")


@pytest.fixture(scope="module")
def analysis(family):
    calibration = torch.randint(0, family_configs()["mixtral"].vocab_size, (600,))
    return analyse_family(family, calibration=calibration, progress=False)


def weighted_error(plan, analysis) -> float:
    errors = analysis.errors
    return sum(errors.frequency(*p) * errors.error(*p, plan.groups[g]) for p, g in plan.assignment.items())


def test_errors_and_distances_see_identical_experts(analysis):
    names = analysis.distances.names
    for layer in analysis.shape.sparse_layers:
        assert float(analysis.distances.l2[(layer, 0)].max()) == 0.0  # expert 0 untouched everywhere
        big = analysis.distances.l2[(layer, 5)][names.index("alpha"), names.index("base")]
        small = analysis.distances.l2[(layer, 1)][names.index("alpha"), names.index("base")]
        assert big > small > 0
    assert sum(analysis.errors.frequency("alpha", 0, e) for e in range(6)) == pytest.approx(1.0)


def test_quality_aware_beats_l2_roundrobin_at_every_budget(analysis):
    sizes = analysis.sizes
    for step in range(6):
        budget = sizes.smallest + (sizes.unshared - sizes.smallest) * step // 5
        ours, published = analysis.plan("quality-aware", budget), analysis.plan("l2-roundrobin", budget)
        for plan in (ours, published):
            assert sizes.stored_bytes(plan.num_stored_experts) <= max(budget, sizes.smallest)
        assert weighted_error(ours, analysis) <= weighted_error(published, analysis) + 1e-9


def test_store_serves_exactly_the_planned_consolidated_variant(family, analysis, tmp_path):
    budget = (analysis.sizes.smallest + analysis.sizes.unshared) // 2
    plan = analysis.plan("quality-aware", budget)
    write_store(family, plan, tmp_path / "store", progress=False)
    assert verify_store(tmp_path / "store") == []
    served = StoreReader(tmp_path / "store").load_variant_models(list(NOISE), torch.float32)
    prompt = torch.randint(0, family_configs()["mixtral"].vocab_size, (9,))
    for variant, model in served.items():
        planned = consolidated_model(plan, variant, analysis.experts, torch.float32)
        ours = model.forward(prompt, [SequenceChunk(model.new_cache(), 0, 9)], all_logits=True)
        reference = planned.forward(prompt, [SequenceChunk(planned.new_cache(), 0, 9)], all_logits=True)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_budget_parsing():
    assert parse_budget("1.5x", 1000) == 1500
    assert parse_budget("2MiB", 1) == 2 * 2**20
    assert parse_budget("800MB", 1) == 800_000_000
    with pytest.raises(MoeplexError, match="budget"):
        parse_budget("lots", 1000)
