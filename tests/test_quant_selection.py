"""`moeplex bench quant`'s selection part (compare_selections) on a fake meter whose quality is known."""

import math
import random
import statistics
from types import SimpleNamespace

from moeplex.planner.configurations import Configuration
from moeplex.quant.bench_store import RANDOM_SEEDS, compare_selections, format_selection

BYTES_PER_EXPERT = {"int4": 1, "int8": 2, "bf16": 4}


class CostMeter:
    """Perplexity = base + the cost of every int4 expert; KL = a tenth of that cost."""

    def __init__(self, costs: dict[str, float], base: float):
        self.costs, self.base, self.expert_ids, self.precisions = costs, base, list(costs), {}

    def use(self, precision_of_id):
        self.precisions = dict(precision_of_id)

    def quality(self, heldout):
        cost = sum(self.costs[e] for e, p in self.precisions.items() if p == "int4")
        return self.base + cost, cost / 10


def fake_profiler(num_experts: int, seed: int):
    rng = random.Random(seed)
    costs = {f"e{i}": rng.uniform(0.01, 1.0) for i in range(num_experts)}
    meter = CostMeter(costs, base=rng.uniform(50, 150))
    # What calibration measured: the true cost, seen through a frequency of one and small error.
    errors = {e: {"int4": c * rng.uniform(0.95, 1.05), "int8": c / 4} for e, c in costs.items()}
    calibration = SimpleNamespace(errors=errors, frequency={e: 1.0 for e in costs})
    return SimpleNamespace(meter=meter, calibration=calibration, num_experts=num_experts,
                           expert_bytes=lambda config: config.expert_bytes(BYTES_PER_EXPERT)), costs


def test_least_error_first_beats_the_mean_of_random_draws_and_the_sem_is_theirs():
    profiler, costs = fake_profiler(num_experts=16, seed=random.randrange(10**6))
    result = compare_selections(profiler, heldout={})
    assert result["random_seeds"] == list(RANDOM_SEEDS) and len(RANDOM_SEEDS) >= 8
    assert result["memory_points"] == [Configuration(round(16 * f), 0, 16 - round(16 * f)).expert_bytes(
        BYTES_PER_EXPERT) / (16 * BYTES_PER_EXPERT["bf16"]) for f in result["int4_fraction"]]
    for i, fraction in enumerate(result["int4_fraction"]):
        int4 = round(16 * fraction)
        cheapest = sum(sorted(costs.values())[:int4])
        # Ranked by estimates within 5% of the truth: at most 1.05 / 0.95 times the cheapest choice's cost.
        assert result["least-error-first"][i] - profiler.meter.base <= cheapest * 1.05 / 0.95 + 1e-9
        assert result["least-error-first"][i] < result["random"][i]
        draws = result["random_per_seed"][i]
        assert len(draws) == len(RANDOM_SEEDS) and result["random"][i] == statistics.mean(draws)
        assert math.isclose(result["random_sem"][i], statistics.stdev(draws) / math.sqrt(len(draws)))
    assert result["bf16_ppl"] == profiler.meter.base
    assert profiler.meter.precisions == {}  # left as all bf16


def test_the_selection_table_shows_every_point_with_the_sem_and_reads_older_json():
    profiler, _ = fake_profiler(num_experts=8, seed=random.randrange(10**6))
    result = compare_selections(profiler, heldout={})
    table = format_selection(result).splitlines()
    assert "sem" in table[1] and len(table) == 2 + len(result["int4_fraction"])
    assert f"{result['random_sem'][0]:.4f}" in table[2]
    del result["random_sem"]  # JSON written before the column existed
    assert "nan" in format_selection(result).splitlines()[2]
