"""Slow end-to-end checks on the trained demo family: perplexity targets, bf16 agreement, consolidation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeplex.cli import main
from moeplex.eval.domains import heldout_token_ids
from moeplex.eval.perplexity import runtime_logits, transformers_logits, windowed_perplexity
from moeplex.model.runtime import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    from moeplex.demo import build_demo_family

    return build_demo_family()


def test_eval_ppl_every_variant_beats_base_on_its_own_domain(demo, tmp_path):
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--json", str(out), "--max-tokens", "2048"]) == 0
    report = json.loads(out.read_text())
    assert "base" in report["models"] and set(report["own_domain"]) == set(demo.variants)
    for variant, domain in report["own_domain"].items():
        assert report["models"][variant][domain] <= 0.85 * report["models"]["base"][domain], variant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runtime_perplexity_matches_transformers_on_demo_models(demo, dtype):
    for name, folder in {"base": demo.base, **demo.variants}.items():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = heldout_token_ids(tokenizer, demo.own_domain.get(name, "prose"), 1024)
        ours = windowed_perplexity(runtime_logits(load_model(folder, dtype=dtype)), ids)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        theirs = windowed_perplexity(transformers_logits(reference), ids)
        assert abs(ours / theirs - 1) <= 0.005, (name, dtype, ours, theirs)


def test_consolidation_sweep_quality_aware_beats_the_published_rule_and_merging(demo, tmp_path):
    out = tmp_path / "sweep.json"
    assert main(["consolidate", "sweep", "--out", str(tmp_path / "work"), "--json", str(out), "--max-tokens", "2048"]) == 0
    sweep = json.loads(out.read_text())
    ours, published = sweep["mean_ppl_increase"]["quality-aware"], sweep["mean_ppl_increase"]["l2-roundrobin"]
    assert len(ours) == len(published) == len(sweep["budgets"]) >= 5
    for budget, a, b in zip(sweep["budgets"], ours, published):
        if a != b or a > 1e-6:  # at the largest budget both may lose nothing at all
            assert a < b, (budget, a, b)
    for method, increase in sweep["baselines_mean_ppl_increase"].items():
        assert ours[0] < increase, method
