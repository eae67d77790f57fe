"""The QoS planner: Pareto frontier, constraint choice, configuration grid, placement file, cache, engine hook, CLI."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
import torch

from moeplex.cli import build_parser, main
from moeplex.engine.llm import LLM
from moeplex.model.sampling import SamplingParams
from moeplex.planner import command as plan_command
from moeplex.planner.cache import CACHE_FILE, MeasurementCache
from moeplex.planner.choice import (
    MAX_PPL_INCREASE,
    MIN_TOKENS,
    ConstraintError,
    Constraints,
    choose_configuration,
)
from moeplex.planner.configurations import Configuration, configuration_grid
from moeplex.planner.meter import MeterSettings, StoreMeter
from moeplex.planner.pareto import Measurement, dominates, pareto_frontier
from moeplex.planner.placement import (
    PLACEMENT_FILE,
    Placement,
    read_placement,
    write_placement,
)
from moeplex.quant.experts import QuantizedExperts
from moeplex.quant.store_copies import QuantizedCopies
from moeplex.store.errors import StoreError
from moeplex.store.layout import QUANTIZED
from tests.test_engine_store import build_serving_store


def point(tokens_per_s: float, ppl: float, int4: int = 0) -> Measurement:
    return Measurement(Configuration(int4, 0, 10 - int4), tokens_per_s, ppl, resident_bytes=1000 - int4)


def random_points(seed: int, count: int = 40) -> list[Measurement]:
    rng = random.Random(seed)
    return [point(rng.uniform(50, 300), rng.uniform(10, 12), int4=i % 11) for i in range(count)]


# ---- Pareto frontier ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_frontier_is_exactly_the_undominated_points_slowest_first(seed):
    points = random_points(seed)
    frontier = pareto_frontier(points)
    expected = [p for p in points if not any(dominates(q, p) for q in points)]
    assert sorted(map(id, frontier)) == sorted(map(id, expected))
    assert 1 < len(frontier) < len(points)
    speeds, ppls = [p.tokens_per_s for p in frontier], [p.ppl for p in frontier]
    assert speeds == sorted(speeds) and ppls == sorted(ppls)  # faster costs perplexity along the frontier


def test_frontier_over_kl_ranks_by_kl_and_rejects_unknown_qualities():
    points = [Measurement(Configuration(i, 0, 10 - i), 100.0 + 10 * i, 11.0 - 0.1 * (i % 3), 1000, kl=0.01 * i) for i in range(8)]
    frontier = pareto_frontier(points, "kl")
    assert frontier == points  # faster always costs KL here, so every point is on the KL frontier
    assert len(pareto_frontier(points, "ppl")) < len(points)
    with pytest.raises(ValueError, match="quality must be one of"):
        pareto_frontier(points, "loss")


def test_a_frontier_result_round_trips_through_json_into_a_plot_over_kl(tmp_path):
    import json

    from moeplex.quant.bench_store import plot_frontier_result

    points = [Measurement(Configuration(i, 0, 10 - i), 100.0 + 10 * i, 11.0, 1000 - i, 0.5 + i / 20, kl=0.01 * i) for i in range(6)]
    result = json.loads(json.dumps({
        "points": [p.to_json() for p in points],
        "frontier_kl": [p.to_json() for p in pareto_frontier(points, "kl")],
        "frontier_kl_tokens_per_s_span": 1.5,
    }))
    assert [Measurement.from_json(p) for p in result["points"]] == points
    path = plot_frontier_result(result, tmp_path / "plots" / "frontier.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_frontier_ties():
    first, duplicate = point(100.0, 11.0, int4=1), point(100.0, 11.0, int4=2)
    same_speed_worse = point(100.0, 11.5, int4=3)
    same_ppl_slower = point(90.0, 11.0, int4=4)
    faster_worse = point(150.0, 12.0, int4=5)
    frontier = pareto_frontier([same_speed_worse, first, same_ppl_slower, duplicate, faster_worse])
    assert frontier == [first, faster_worse]  # of exactly equal points the first given stays
    assert pareto_frontier([]) == []


# ---- constraint choice -------------------------------------------------------------------------------------

REFERENCE_PPL = 10.0
POINTS = [point(100, 10.0, 0), point(140, 10.2, 1), point(180, 10.6, 2), point(230, 11.5, 3), point(120, 10.9, 4)]


def test_choice_meets_the_constraints():
    assert choose_configuration(POINTS, Constraints(), REFERENCE_PPL) is POINTS[0]  # none: best perplexity
    assert choose_configuration(POINTS, Constraints(min_tokens_per_s=150), REFERENCE_PPL) is POINTS[2]
    assert choose_configuration(POINTS, Constraints(max_ppl_increase=0.07), REFERENCE_PPL) is POINTS[2]  # fastest within
    assert choose_configuration(POINTS, Constraints(130, 0.07), REFERENCE_PPL) is POINTS[1]  # best among both


def test_unreachable_speed_names_the_constraint_and_the_fastest_point():
    with pytest.raises(ConstraintError, match=f"--{MIN_TOKENS} 500 cannot be met.*230.0 tokens/s") as caught:
        choose_configuration(POINTS, Constraints(min_tokens_per_s=500), REFERENCE_PPL)
    assert caught.value.failing == [MIN_TOKENS] and caught.value.closest is POINTS[3]


def test_unreachable_quality_names_the_constraint_and_the_best_point():
    worse = [p for p in POINTS if p.ppl > 10.1]
    with pytest.raises(ConstraintError, match=f"--{MAX_PPL_INCREASE} 0.01 cannot be met") as caught:
        choose_configuration(worse, Constraints(max_ppl_increase=0.01), REFERENCE_PPL)
    assert caught.value.failing == [MAX_PPL_INCREASE] and caught.value.closest is POINTS[1]


def test_constraints_that_each_hold_alone_but_not_together():
    with pytest.raises(ConstraintError, match="cannot be met together.*closest point: int4=") as caught:
        choose_configuration(POINTS, Constraints(min_tokens_per_s=200, max_ppl_increase=0.03), REFERENCE_PPL)
    assert caught.value.closest in POINTS and caught.value.failing


# ---- configuration grid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts,steps", [(160, 4), (13, 3), (7, 8)])
def test_grid_splits_every_expert_and_spans_all_bf16_to_all_int4(experts, steps):
    grid = configuration_grid(experts, steps)
    assert len(grid) == (steps + 1) * (steps + 2) // 2
    if experts >= steps:
        assert len(set(grid)) == len(grid)
    assert all(c.int4 + c.int8 + c.bf16 == experts and min(c.int4, c.int8, c.bf16) >= 0 for c in grid)
    assert Configuration(0, 0, experts) in grid and Configuration(experts, 0, 0) in grid and Configuration(0, experts, 0) in grid


def test_expert_bytes_count_each_precision():
    config = Configuration(3, 2, 5)
    assert config.expert_bytes({"int4": 10, "int8": 20, "bf16": 40}) == 30 + 40 + 200


# ---- placement file and cache ------------------------------------------------------------------------------


def test_placement_round_trip_and_corrupt_files_name_the_file(tmp_path):
    assert read_placement(tmp_path) is None
    rng = random.Random(5)
    precision = {f"{rng.getrandbits(64):016x}": rng.choice(["int4", "int8", "bf16"]) for _ in range(12)}
    placement = Placement(precision, group_size=64, device_memory_bytes=12345, configuration={"int4": 4, "int8": 4, "bf16": 4})
    path = write_placement(tmp_path, placement)
    assert path == tmp_path / PLACEMENT_FILE and read_placement(tmp_path) == placement
    assert [p.name for p in tmp_path.iterdir()] == [PLACEMENT_FILE]  # no temporary file left behind
    path.write_text(path.read_text()[:40])
    with pytest.raises(StoreError, match=f"{PLACEMENT_FILE}: truncated or not valid JSON"):
        read_placement(tmp_path)
    path.write_text(json.dumps({**json.loads(json.dumps(placement.__dict__)), "precision": {"abc": "int2"}}))
    with pytest.raises(StoreError, match=f"{PLACEMENT_FILE}: 'precision' must map"):
        read_placement(tmp_path)
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(StoreError, match="not a placement file of version 1"):
        read_placement(tmp_path)


def test_cache_reuses_measurements_of_the_same_context_only(tmp_path):
    context = {"manifest_sha256": "ab", "repeats": 3}
    MeasurementCache(tmp_path, context).add_measurement("int4=1,int8=0,bf16=9", {"tokens_per_s": 12.5, "ppl": 3.25})
    assert MeasurementCache(tmp_path, context).measurement("int4=1,int8=0,bf16=9") == {"tokens_per_s": 12.5, "ppl": 3.25}
    assert MeasurementCache(tmp_path, {**context, "repeats": 5}).measurement("int4=1,int8=0,bf16=9") is None
    (tmp_path / CACHE_FILE).write_text("{not json")
    with pytest.raises(StoreError, match=CACHE_FILE):
        MeasurementCache(tmp_path, context)


# ---- a real (tiny) store -----------------------------------------------------------------------------------

FAST = MeterSettings(new_tokens=3, prompt_tokens=4, repeats=1, calibration_tokens_per_domain=32, heldout_tokens_per_domain=32,
                     group_size=32, threads=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_serving_store(tmp_path_factory.mktemp("planner"))


def greedy_tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    return [output.token_ids for output in llm.generate(prompts, variant="python", sampling=params)]


@pytest.mark.parametrize("selection_error", ["model", "expert"])
def test_bank_calibration_pools_every_variant_per_expert_id(store, selection_error):
    meter = StoreMeter(store, dataclasses.replace(FAST, selection_error=selection_error))
    calibration = meter.calibrate(meter.calibration_texts())
    assert set(calibration.frequency) == set(calibration.errors) == set(meter.expert_ids)
    sparse_layers = sum(next(iter(meter.models.values())).spec.sparse_layers)
    assert sum(calibration.frequency.values()) == pytest.approx(sparse_layers)  # each variant's layer sums to 1
    routed = [i for i, f in calibration.frequency.items() if f > 0]
    assert routed and all(0 < calibration.errors[i]["int8"] < calibration.errors[i]["int4"] for i in routed)


def test_engine_runs_the_experts_in_the_placements_precisions(store):
    prompts = torch.randint(3, 150, (3, 6), generator=torch.Generator().manual_seed(21)).tolist()
    with LLM(store, use_placement=False) as llm:
        expert_ids = list(llm.engine.runner.bank.row_of)
        dense_bytes = llm.engine.runner.bank.nbytes
        reference = greedy_tokens(llm, prompts)
    rng = random.Random(22)
    try:
        write_placement(store, Placement(dict.fromkeys(expert_ids, "bf16"), group_size=32))
        with LLM(store) as llm:
            assert greedy_tokens(llm, prompts) == reference  # all bf16: the same model
        mixed = {expert_id: rng.choice(["int4", "int8", "bf16"]) for expert_id in expert_ids}
        write_placement(store, Placement(mixed, group_size=32))
        with LLM(store) as llm:
            bank = llm.engine.runner.bank
            assert isinstance(bank.compute, QuantizedExperts)
            assert {i: bank.compute.precisions[(0, row)] for i, row in bank.row_of.items()} == mixed
            assert bank.nbytes < dense_bytes
            assert all(len(tokens) == 8 for tokens in greedy_tokens(llm, prompts))
    finally:
        (store / PLACEMENT_FILE).unlink(missing_ok=True)


def test_engine_names_a_placement_with_unknown_experts(store):
    try:
        write_placement(store, Placement({"0" * 64: "int4"}, group_size=32))
        with pytest.raises(StoreError, match=f"{PLACEMENT_FILE}: names expert ids"):
            LLM(store)
    finally:
        (store / PLACEMENT_FILE).unlink(missing_ok=True)


def test_plan_writes_a_placement_and_reuses_measurements(store, tmp_path, monkeypatch):
    timed = []
    original = StoreMeter.time_runs
    monkeypatch.setattr(StoreMeter, "time_runs", lambda self: timed.append(self.timed_models is self.models) or original(self))
    try:
        first = plan_command.run_plan(store, "1x", Constraints(), tmp_path / "frontier.png", steps=1, settings=FAST)
        assert timed == [True] * 3 and (tmp_path / "frontier.png").stat().st_size > 1000  # one round, all resident
        placement = read_placement(store)
        assert placement.configuration == first.chosen.config.to_json()
        assert sum(p == "int4" for p in placement.precision.values()) == first.chosen.config.int4
        copies = QuantizedCopies.load(store)  # the engine reads the chosen precisions from the store's copies
        assert all(copies.has(i, p, FAST.group_size) for i, p in placement.quantized().items())
        second = plan_command.run_plan(store, "1x", Constraints(), None, steps=1, settings=FAST)
        assert len(timed) == 3  # every measurement came from the store's cache
        assert [p.to_json() for p in second.points] == [p.to_json() for p in first.points]
    finally:
        for name in (PLACEMENT_FILE, CACHE_FILE):
            (store / name).unlink(missing_ok=True)
        shutil.rmtree(store / QUANTIZED, ignore_errors=True)


def test_plan_measures_what_does_not_fit_offloaded_or_leaves_it_out(store, monkeypatch):
    offloaded = []
    original = StoreMeter.time_runs
    monkeypatch.setattr(StoreMeter, "time_runs", lambda self: offloaded.append(self.timed_models is not self.models) or original(self))
    meter = StoreMeter(store, FAST)
    bf16_experts = len(meter.expert_ids) * meter.bytes_per_expert()["bf16"]
    device_memory = str(meter.backbone_bytes() + int(0.4 * bf16_experts))  # all int4 fits (~30%), all int8 (~50%) does not
    try:
        tight = plan_command.run_plan(store, device_memory, Constraints(), None, steps=1, settings=FAST)
        assert tight.skipped == 0 and len(tight.points) == 3 and offloaded == [True, True, False]  # bf16, int8, int4
        fraction = {(p.config.int4, p.config.int8): p.resident_fraction for p in tight.points}
        assert fraction[0, 0] < fraction[0, len(meter.expert_ids)] < 1 == fraction[len(meter.expert_ids), 0]
        assert all(p.resident_bytes <= tight.budget_bytes for p in tight.points)
        copies = QuantizedCopies.load(store)  # the offloaded int8 configuration fetched its experts from the store's copies
        assert all(copies.has(i, "int8", FAST.group_size) for i in meter.expert_ids)
        resident = plan_command.run_plan(store, device_memory, Constraints(), None, steps=1, settings=FAST, resident_only=True)
        assert resident.skipped == 2 and [p.config.int4 for p in resident.points] == [len(meter.expert_ids)]
        with pytest.raises(plan_command.MoeplexError, match="less than one bf16 expert"):
            plan_command.run_plan(store, "1KB", Constraints(), None, steps=1, settings=FAST)
    finally:
        for name in (PLACEMENT_FILE, CACHE_FILE):
            (store / name).unlink(missing_ok=True)
        shutil.rmtree(store / QUANTIZED, ignore_errors=True)


# ---- command line ------------------------------------------------------------------------------------------


def test_plan_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["plan", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ("--device-memory", "--min-tokens-per-second", "--max-ppl-increase", "--plot"):
        assert option in text


def test_plan_names_a_missing_store(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing"), "--device-memory", "1x"]) == 1
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("texts_of", [StoreMeter.heldout_texts, StoreMeter.calibration_texts], ids=["heldout", "calibration"])
def test_each_variant_is_scored_and_calibrated_on_its_own_domains_text(store, texts_of):
    meter = StoreMeter(store, FAST)
    assert meter.manifest.own_domain == {}
    every = texts_of(meter)
    assert all(torch.equal(ids, every["base"]) for ids in every.values())  # no own domain: every domain's text
    meter.manifest.own_domain = {"python": "python", "cpp": "not a demo domain"}
    texts = texts_of(meter)
    assert 0 < texts["python"].numel() < every["base"].numel()
    assert torch.equal(texts["python"], every["base"][: texts["python"].numel()])  # python is the first demo domain
    assert torch.equal(texts["cpp"], every["base"]) and torch.equal(texts["base"], every["base"])
    ppl, kl = meter.quality(texts)
    assert ppl > 1 and kl == pytest.approx(0, abs=1e-6)  # all bf16: no KL from itself
