"""OffloadedExperts in the runtime: greedy outputs equal the resident run at any budget; store traces; read errors."""

import pytest
import torch

from moeplex.consolidate.family_spec import FamilySpec
from moeplex.consolidate.plan import identity_plan
from moeplex.errors import ExpertReadError
from moeplex.model.generate import generate
from moeplex.model.runtime import load_model
from moeplex.model.sampling import SamplingParams
from moeplex.offload.calibration import calibrate
from moeplex.offload.config import OffloadConfig
from moeplex.offload.evaluation import PredictionScorer
from moeplex.offload.loading import load_offloaded_model
from moeplex.offload.tracing import TRACES_FOLDER, TraceLibrary
from moeplex.store import StoreReader, write_store
from tests.conftest import saved_random_model

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def mixtral_checkpoint(tmp_path_factory):
    return saved_random_model(tmp_path_factory.mktemp("offload_mixtral"), seed=41)


@pytest.fixture(scope="module")
def mixtral_store(mixtral_checkpoint, tmp_path_factory):
    spec = load_model(mixtral_checkpoint, dtype=torch.float32).spec
    family = FamilySpec("offload-test", base=None, variants={"base": mixtral_checkpoint})
    plan = identity_plan(("base",), spec.num_layers, spec.num_experts, tuple(range(spec.num_layers)))
    return write_store(family, plan, tmp_path_factory.mktemp("offload_store") / "store", progress=False)


def prompts(seed, count=3, length=6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 160, (count, length), generator=generator).tolist()


def greedy(model, batch):
    return [c.token_ids for c in generate(model, batch, GREEDY)]


def offloaded_greedy(path, config, batch):
    model = load_offloaded_model(path, config, dtype=torch.float32)
    try:
        with model.experts.request("base"):
            return greedy(model, batch), model.experts.pool
    finally:
        model.experts.close()


CONFIGS = {
    "lru": {"policy": "lru", "prediction": "none", "prefetch": False},
    "lfu": {"policy": "lfu", "prediction": "none", "prefetch": False},
    "moeplex": {"policy": "trace", "prediction": "combined", "prefetch": True},
    "lookahead": {"policy": "trace", "prediction": "lookahead", "prefetch": True, "window": 3, "min_probability": 0.2},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("budget_experts", [1, 3, 9, 18])  # one expert; one per layer; half; all
def test_greedy_outputs_equal_the_resident_run_at_any_budget(mixtral_checkpoint, name, budget_experts):
    resident = load_model(mixtral_checkpoint, dtype=torch.float32)
    batch = prompts(seed=budget_experts)
    config = OffloadConfig(device_budget=budget_experts * resident.spec.expert_numel * 4, **CONFIGS[name])
    got, pool = offloaded_greedy(mixtral_checkpoint, config, batch)
    assert got == greedy(resident, batch)
    assert len(pool.resident_keys()) <= budget_experts
    if budget_experts < 18:
        assert pool.stats.evictions > 0
    else:
        assert pool.stats.misses <= 18 and pool.stats.evictions == 0  # each expert read once


def test_store_backed_offloading_matches_and_loads_saved_traces(mixtral_store):
    reader = StoreReader(mixtral_store)
    resident = reader.load_variant_model("base", dtype=torch.float32)
    batch = prompts(seed=51)
    config = OffloadConfig(device_budget=4 * resident.spec.expert_numel * 4)
    model = load_offloaded_model(mixtral_store, config, dtype=torch.float32)
    try:
        assert calibrate(model, prompts(seed=52, count=4), new_tokens=5, variant="base") == 4
        with model.experts.request("base"):
            assert greedy(model, batch) == greedy(resident, batch)
        model.experts.forecaster.tracer.library.save(mixtral_store / TRACES_FOLDER)
    finally:
        model.experts.close()
    reloaded = load_offloaded_model(mixtral_store, config, dtype=torch.float32)
    reloaded.experts.close()
    library: TraceLibrary = reloaded.experts.forecaster.tracer.library
    assert len(library) == 5  # 4 calibration requests + the batch above
    assert torch.equal(library.matrices(), model.experts.forecaster.tracer.library.matrices())


def test_a_damaged_expert_file_raises_an_error_naming_it(mixtral_store, tmp_path):
    import shutil

    store = shutil.copytree(mixtral_store, tmp_path / "store")
    expert_id = StoreReader(store).expert_table("base")[1][2]
    damaged = store / "experts" / f"{expert_id}.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    config = OffloadConfig(device_budget=10**9, prediction="none", prefetch=False, policy="lru")
    model = load_offloaded_model(store, config, dtype=torch.float32)
    routed_to_it = torch.zeros(2, 2, dtype=torch.long)
    routed_to_it[:, 0] = 2
    routed_to_it[:, 1] = 3
    hidden = torch.randn(2, model.spec.hidden_size, generator=torch.Generator().manual_seed(53))
    with pytest.raises(ExpertReadError, match=str(damaged)):
        model.experts(1, hidden, routed_to_it, torch.full((2, 2), 0.5))
    ok = model.experts(0, hidden, routed_to_it, torch.full((2, 2), 0.5))  # other experts still serve
    assert torch.isfinite(ok).all() and ok.abs().sum() > 0


def test_scored_predictions_report_precision_and_recall_by_distance(mixtral_checkpoint):
    scorer = PredictionScorer(num_layers=3, threshold=0.5)
    config = OffloadConfig(device_budget=10**9, prefetch=False, window=2)
    model = load_offloaded_model(mixtral_checkpoint, config, dtype=torch.float32, scorer=scorer)
    with model.experts.request("base"):
        greedy(model, prompts(seed=54, count=1))
    report = scorer.report()
    assert set(report) == {1, 2}
    assert report[1]["scored"] >= 2 * (3 * 10 - 1)  # at least k experts at every layer visit but the very first
    assert all(0.0 <= r["recall"] <= 1.0 and 0.0 <= r["precision"] <= 1.0 for r in report.values())
    assert report[1]["recall"] > 0.3  # better than nothing on a random model (chance: 2 of 6 experts)
