"""The routing replay (`moeplex.offload.replay`): exact timings on small cases, LRU and Belady victims, Belady never behind LRU, clear errors."""

import random

import pytest
import torch

from moeplex.bench.offload_ceiling import RoutingRecorder, measured_costs
from moeplex.offload.pool import PoolStats
from moeplex.offload.replay import Replayed, ReplayCosts, replay

COSTS = ReplayCosts(layer_seconds=0.002, expert_seconds=0.001, read_bytes_per_second=1000.0)  # a 10-byte expert reads in 10 ms


def sizes(keys, nbytes=10):
    return {key: nbytes for key in keys}


def random_steps(rng, steps, layers, experts, top_k):
    """Routing with per-request locality: each layer favours two experts, like a request's own trace."""
    favoured = [rng.sample(range(experts), 2) for _ in range(layers)]
    return [
        [tuple(sorted({(layer, rng.choice(favoured[layer]) if rng.random() < 0.6 else rng.randrange(experts)) for _ in range(top_k)})) for layer in range(layers)]
        for _ in range(steps)
    ]


def test_everything_cached_costs_only_compute_after_the_first_step():
    steps = [[("a", "b"), ("c",)]] * 3
    replayed = replay(steps, [False, True, True], capacity_bytes=30, nbytes=sizes("abc"), costs=COSTS)
    assert replayed.seconds_per_step == pytest.approx(2 * 0.002 + 3 * 0.001)
    assert replayed.misses_per_step == 0 and replayed.reads_per_step == 0


def test_lru_on_demand_waits_one_read_per_miss():
    steps = [[("a",)], [("b",)], [("a",)]]  # one expert of room: every step misses
    replayed = replay(steps, [True] * 3, capacity_bytes=10, nbytes=sizes("ab"), costs=COSTS)
    assert replayed.seconds_per_step == pytest.approx(0.002 + 0.010 + 0.001)
    assert replayed.misses_per_step == 1 and replayed.reads_per_step == 1


def test_lru_evicts_the_least_recent_and_belady_the_one_needed_furthest_ahead():
    steps = [[("a",)], [("b",)], [("a",)], [("c",)], [("b",)]]  # room for two: at c, LRU drops b, Belady drops a
    lru = replay(steps, [True] * 5, 20, sizes("abc"), COSTS)
    belady = replay(steps, [True] * 5, 20, sizes("abc"), COSTS, oracle_window=0)
    assert lru.misses_per_step * 5 == 4  # a, b, c, then b again
    assert belady.misses_per_step * 5 == 3  # a, b, c


def test_the_oracle_reads_ahead_and_hides_a_read_shorter_than_a_layer():
    slow_layers = ReplayCosts(layer_seconds=0.020, expert_seconds=0.001, read_bytes_per_second=1000.0)
    steps = [[("a",), ("b",), ("c",), ("d",)]] * 4  # room for two of four: LRU misses every layer
    timed = [False, True, True, True]
    lru = replay(steps, timed, 20, sizes("abcd"), slow_layers)
    oracle = replay(steps, timed, 20, sizes("abcd"), slow_layers, oracle_window=1)
    assert lru.misses_per_step == 4
    assert oracle.misses_per_step == 0 and oracle.reads_per_step < 4  # reads start a layer early; Belady keeps some across steps
    assert oracle.seconds_per_step == pytest.approx(4 * (0.020 + 0.001))
    assert lru.seconds_per_step == pytest.approx(4 * (0.020 + 0.010 + 0.001))


def test_belady_is_never_behind_lru_and_reading_ahead_never_hurts_when_nothing_is_evicted():
    rng = random.Random()
    for _ in range(20):
        layers, experts = rng.randint(2, 6), rng.randint(4, 10)
        steps = random_steps(rng, 40, layers, experts, top_k=2)
        keys = {key for step in steps for layer in step for key in layer}
        capacity = 10 * rng.randint(2, max(2, len(keys) - 1))
        timed = [index >= 5 for index in range(len(steps))]
        costs = ReplayCosts(rng.uniform(0.001, 0.01), rng.uniform(0.0005, 0.002), rng.uniform(500, 5000))
        lru = replay(steps, timed, capacity, sizes(keys), costs)
        belady = replay(steps, timed, capacity, sizes(keys), costs, oracle_window=0)
        assert belady.misses_per_step <= lru.misses_per_step
        assert belady.seconds_per_step <= lru.seconds_per_step + 1e-12
        everything = 10 * len(keys)
        on_demand = replay(steps, timed, everything, sizes(keys), costs, oracle_window=0)
        for window in (1, 2, layers):
            ahead = replay(steps, timed, everything, sizes(keys), costs, oracle_window=window)
            assert ahead.misses_per_step <= on_demand.misses_per_step
            assert ahead.seconds_per_step <= on_demand.seconds_per_step + 1e-12


def test_a_layer_whose_experts_do_not_fit_together_runs_in_chunks():
    replayed = replay([[("a", "b")]], [True], capacity_bytes=10, nbytes=sizes("ab"), costs=COSTS)  # room for one
    assert replayed.seconds_per_step == pytest.approx(0.002 + 2 * (0.010 + 0.001))
    assert replayed.misses_per_step == 2


def test_bad_replays_are_refused():
    steps = [[("a",)]]
    with pytest.raises(ValueError, match="cannot hold one expert"):
        replay(steps, [True], 5, sizes("a"), COSTS)
    with pytest.raises(ValueError, match="timed flags"):
        replay(steps, [True, True], 10, sizes("a"), COSTS)
    with pytest.raises(ValueError, match="no step is timed"):
        replay(steps, [False], 10, sizes("a"), COSTS)


class DoubleExperts:
    def __init__(self):
        self.calls = []

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        self.calls.append(layer)
        return 2 * hidden


def test_the_recorder_keeps_each_passes_keys_and_times_decode_steps_only():
    table = [None, ["x0", "x1", "x2"], ["y0", "y1", "y2"]]  # a dense first layer
    inner = DoubleExperts()
    recorder = RoutingRecorder(inner, table)
    prefill, decode = torch.randn(3, 4), torch.randn(1, 4)
    weights = torch.rand(3, 2)
    out = recorder(1, prefill, torch.tensor([[0, 2], [2, 0], [0, 2]]), weights)
    assert torch.equal(out, 2 * prefill)
    recorder(2, prefill, torch.tensor([[1, 0], [1, 0], [0, 1]]), weights)
    recorder(1, decode, torch.tensor([[2, 1]]), weights[:1])
    recorder(2, decode, torch.tensor([[0, 2]]), weights[:1])
    assert recorder.steps == [[("x0", "x2"), ("y0", "y1")], [("x1", "x2"), ("y0", "y2")]]
    assert recorder.timed() == [False, True] and recorder.timed(skip_steps=2) == [False, False]
    assert recorder.decode_steps == 1 and recorder.decode_expert_calls == 4 and inner.calls == [1, 2, 1, 2]

    stats = PoolStats(wait_seconds=0.5, bytes_read={"disk": 10**9, "host": 0})
    costs = measured_costs(recorder, resident_tokens_per_s=10.0, lru_stats=stats)
    assert costs.read_bytes_per_second == pytest.approx(2e9)
    assert costs.expert_seconds == pytest.approx(recorder.decode_expert_seconds / 4)
    assert costs.layer_seconds == pytest.approx((0.1 - recorder.decode_expert_seconds) / 2)
    with pytest.raises(ValueError, match="read nothing from disk"):
        measured_costs(recorder, 10.0, PoolStats())


def test_the_recorder_reports_the_median_over_requests_of_a_replay():
    recorder = RoutingRecorder(DoubleExperts(), [["e0", "e1"]])
    for rows in (3, 1, 1, 2, 1, 4, 1, 1, 1):  # three requests: a prefill, then decode steps
        recorder(0, torch.randn(rows, 4), torch.randint(0, 2, (rows, 1)), torch.rand(rows, 1))
    assert recorder.timed() == [False, True, True, False, True, False, True, True, True]
    replayed = Replayed(step_seconds=(0.1, 0.3, 0.5, 0.2, 0.2, 0.2), misses_per_step=0.0, reads_per_step=0.0)
    assert recorder.median_tokens_per_s(replayed) == pytest.approx(5.0)  # requests at 2/0.4, 1/0.5 and 3/0.6 tokens/s
    replayed_after_warmup = Replayed(step_seconds=(0.5, 0.2, 0.2, 0.2), misses_per_step=0.0, reads_per_step=0.0)
    assert recorder.median_tokens_per_s(replayed_after_warmup, skip_steps=3) == pytest.approx(3.5)  # 2 and 5 tokens/s
