"""`moeplex bench offload`'s measurement on a small store: every system timed, predictions scored apart from the timing."""

import pytest

from moeplex.bench import offload
from moeplex.bench.offload import BenchSetup, measure_budget, random_prompts
from moeplex.offload.bench_options import OffloadBenchSettings
from tests import test_engine
from tests.test_engine_store import one_torch_thread  # noqa: F401 (autouse fixture)

store = test_engine.store  # a small Mixtral store with a "base" variant


def test_measure_budget_times_every_system_and_scores_predictions_untimed(store, monkeypatch):
    settings = OffloadBenchSettings(new_tokens=4, prompt_tokens=6, repeats=2, calibration_requests=2)
    setup = BenchSetup.open(store)
    prompts = random_prompts(5, settings.prompt_tokens, setup.spec.vocab_size, seed=7)
    setup.seed_library(prompts[:2], settings)
    scored_while_timed = []
    timed = offload.decode_tokens_per_s

    def watch(model, prompt, new_tokens):
        forecaster = getattr(model.experts, "forecaster", None)
        scored_while_timed.append(forecaster is not None and forecaster.scorer is not None)
        return timed(model, prompt, new_tokens)

    monkeypatch.setattr(offload, "decode_tokens_per_s", watch)
    measured = measure_budget(setup, setup.expert_bytes // 4, prompts[2], prompts[3:], settings, progress=lambda _: None)

    assert set(measured["tokens_per_s"]) == {"lru", "lfu", "moeplex", "resident"}
    assert all(rate > 0 for rate in measured["tokens_per_s"].values())
    for stats in measured["pool"].values():
        assert 0.0 <= stats["hit_rate"] <= 1.0 and stats["misses"] > 0  # a quarter of the experts: some must be fetched
    # 4 systems x (warm-up + 2 timed requests), then the 2 requests again on a fresh moeplex model with a scorer
    assert scored_while_timed == [False] * 12 + [True] * 2
    assert measured["prediction"][1]["scored"] > 0
    assert 0.0 <= measured["prediction"][1]["recall"] <= 1.0
    ceiling = measured["ceiling"]  # the resident model's routing replayed at this budget
    assert ceiling["lru"] > 0 and ceiling["lru_misses_per_token"] > 0
    assert set(ceiling["oracle"]) == {"window_0", f"window_{settings.window}", f"window_{setup.spec.num_layers}"}
    assert ceiling["oracle"]["window_0"]["misses_per_token"] <= ceiling["lru_misses_per_token"]  # Belady never misses more
    assert all(entry["tokens_per_s"] > 0 for entry in ceiling["oracle"].values())


def test_a_budget_below_one_expert_is_refused(store):
    setup = BenchSetup.open(store)
    with pytest.raises(ValueError, match="smaller than one expert"):
        setup.offloaded("moeplex", 1, OffloadBenchSettings())
