"""Least-error-first's error at the model's output: each expert id quantized alone, scored by the KL it causes."""

from __future__ import annotations

import pytest
import torch

from moeplex.planner.meter import MeterSettings, StoreMeter
from moeplex.planner.model_error import model_output_errors, variants_using
from tests.test_engine_store import build_serving_store
from tests.test_planner import FAST


@pytest.fixture(scope="module")
def meter(tmp_path_factory):
    meter = StoreMeter(build_serving_store(tmp_path_factory.mktemp("model_error")), FAST)
    yield meter
    meter.close()


def test_variants_using_lists_each_variant_whose_table_names_the_id():
    tables = {"a": [None, ["x", "y"]], "b": [["y", "z"], None]}
    assert variants_using(tables) == {"x": ["a"], "y": ["a", "b"], "z": ["b"]}


def test_the_error_times_frequency_is_the_kl_with_that_expert_alone_quantized(meter):
    generator = torch.Generator().manual_seed(31)
    texts = {variant: torch.randint(3, 150, (40 + 4 * i,), generator=generator) for i, variant in enumerate(meter.models)}
    ids = meter.expert_ids
    frequency = {expert_id: 0.1 + 0.8 * i / len(ids) for i, expert_id in enumerate(ids)}
    frequency[ids[-1]] = 0.0  # never routed on calibration text: nothing to measure
    errors = model_output_errors(meter, texts, frequency)
    assert set(errors) == set(ids)
    assert errors[ids[-1]] == {"int4": 0.0, "int8": 0.0}
    for expert_id in (ids[0], ids[len(ids) // 2]):
        meter.use({expert_id: "int4"})
        _, kl = meter.quality(texts)  # every variant on its own text, those without the id included
        assert errors[expert_id]["int4"] * frequency[expert_id] == pytest.approx(kl, rel=1e-6)
        assert 0 < errors[expert_id]["int8"] < errors[expert_id]["int4"]
    meter.use({})


def test_a_variant_without_the_expert_is_untouched_by_its_quantization(meter):
    users = variants_using(meter.tables)
    expert_id, variant = next((i, v) for i, names in users.items() for v in meter.models if v not in names)
    texts = {v: torch.randint(3, 150, (40,), generator=torch.Generator().manual_seed(32)) for v in meter.models}
    meter.use({expert_id: "int4"})
    assert meter.quality_by_variant(texts, [variant])[variant][1] == 0.0
    meter.use({})


def test_an_unknown_selection_error_is_refused():
    with pytest.raises(ValueError, match="selection_error must be one of model, expert"):
        MeterSettings(selection_error="logits")
