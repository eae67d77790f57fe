"""The expert pool (budgets, hits, evictions, read errors) and the prefetcher (priorities, stale work, protection)."""

import threading

import pytest
import torch

from moeplex.errors import ExpertReadError
from moeplex.offload.policies import LRUPolicy, TraceAwarePolicy
from moeplex.offload.pool import ExpertPool
from moeplex.offload.prefetcher import Prefetcher, PrefetchRequest
from moeplex.offload.sources import ExpertWeights

HIDDEN, INTER = 8, 4


class MemorySource:
    """Random experts by key; reads can be held at a gate, and one key can fail."""

    def __init__(self, keys, seed=31, failing=None):
        generator = torch.Generator().manual_seed(seed)
        self.weights = {
            key: ExpertWeights(torch.randn(2 * INTER, HIDDEN, generator=generator), torch.randn(HIDDEN, INTER, generator=generator))
            for key in keys
        }
        self.failing = failing
        self.reads: list = []
        self.gate = threading.Event()
        self.gate.set()
        self.reading = threading.Event()

    def expert_nbytes(self, key):
        return self.weights[key].nbytes

    def read(self, key):
        self.reads.append(key)
        self.reading.set()
        self.gate.wait()
        if key == self.failing:
            raise ExpertReadError(f"expert {key}: cannot read /store/experts/{key}.safetensors (injected)")
        return self.weights[key], self.weights[key].nbytes


KEYS = ["a", "b", "c", "d", "e"]
ONE = MemorySource(KEYS).expert_nbytes("a")


def test_demands_hit_miss_and_evict_within_the_budget():
    source = MemorySource(KEYS)
    pool = ExpertPool(source, LRUPolicy(), device_budget=2 * ONE)
    got = pool.ensure_resident(["a", "b"])
    assert torch.equal(got[1].down, source.weights["b"].down)
    pool.ensure_resident(["a"])  # a is now more recent than b
    pool.ensure_resident(["c"])
    assert pool.resident_keys() == {"a", "c"}
    assert (pool.stats.hits, pool.stats.misses, pool.stats.evictions) == (1, 3, 1)
    assert pool.stats.bytes_read["disk"] == 3 * ONE
    with pytest.raises(ValueError, match="over the device budget"):
        pool.ensure_resident(["a", "b", "c"])


def test_host_tier_serves_evicted_experts_without_disk():
    source = MemorySource(KEYS)
    pool = ExpertPool(source, LRUPolicy(), device_budget=ONE, host_budget=ONE)
    pool.ensure_resident(["a"])
    pool.ensure_resident(["b"])  # a goes to the host tier
    pool.ensure_resident(["a"])
    assert source.reads == ["a", "b"]
    assert pool.stats.bytes_read == {"disk": 2 * ONE, "host": ONE}


def test_a_read_error_names_the_file_and_leaves_the_pool_usable():
    source = MemorySource(KEYS, failing="b")
    pool = ExpertPool(source, LRUPolicy(), device_budget=2 * ONE)
    with pytest.raises(ExpertReadError, match="experts/b.safetensors"):
        pool.ensure_resident(["a", "b"])
    assert torch.equal(pool.ensure_resident(["c"])[0].gate_up, source.weights["c"].gate_up)
    assert pool.resident_keys() == {"a", "c"}


def trace_pool(source, budget_experts, reuse):
    policy = TraceAwarePolicy()
    policy.set_reuse(reuse)
    return ExpertPool(source, policy, device_budget=budget_experts * ONE)


def test_prefetch_never_evicts_protected_experts_nor_better_ranked_ones():
    source = MemorySource(KEYS)
    pool = trace_pool(source, 2, {"a": 0.1, "b": 0.1, "c": 0.9, "d": 0.05})
    pool.ensure_resident(["a", "b"])  # protected: the current layer's
    assert not pool.prefetch("c")
    assert pool.resident_keys() == {"a", "b"}
    pool.ensure_resident(["a"])  # now only a is protected
    assert not pool.prefetch("d")  # ranked below b, the would-be victim
    assert pool.prefetch("c")
    assert pool.resident_keys() == {"a", "c"}


def test_prefetched_bytes_are_counted_as_used_or_wasted():
    source = MemorySource(KEYS)
    pool = trace_pool(source, 3, {"a": 0.85, "b": 0.9, "c": 0.8, "d": 0.95})
    pool.ensure_resident(["a"])
    assert pool.prefetch("b") and pool.prefetch("c")
    pool.ensure_resident(["b"])  # used
    assert pool.prefetch("d")  # evicts c (lowest apart from the protected b), unused
    assert pool.resident_keys() == {"a", "b", "d"}
    assert pool.stats.prefetched_bytes == 3 * ONE
    assert pool.stats.prefetch_used_bytes == ONE
    assert pool.stats.prefetch_wasted_bytes == ONE
    assert pool.stats.prefetch_accuracy == pytest.approx(0.5)


def test_prefetcher_fetches_by_priority_and_drops_stale_work():
    source = MemorySource(KEYS)
    pool = trace_pool(source, 5, {key: 0.5 for key in KEYS})
    source.gate.clear()
    with Prefetcher(pool) as prefetcher:
        prefetcher.submit([PrefetchRequest("b", 0.6, 2), PrefetchRequest("a", 0.9, 1), PrefetchRequest("c", 0.6, 1)])
        assert source.reading.wait(5)  # the worker holds the likeliest, a, at the gate
        prefetcher.submit([PrefetchRequest("d", 0.7, 1), PrefetchRequest("c", 0.6, 1)])  # b is stale now
        source.gate.set()
        assert prefetcher.wait_until_idle(5)
        assert source.reads == ["a", "d", "c"]
        assert prefetcher.stats.dropped_stale == 1
        assert prefetcher.stats.fetched == 3
    assert pool.resident_keys() == {"a", "c", "d"}


def test_the_prefetch_worker_fetches_on_one_omp_thread():
    source = MemorySource(KEYS)
    pool = trace_pool(source, 5, {key: 0.5 for key in KEYS})
    threads_while_reading = []
    read = source.read
    source.read = lambda key, *args, **kwargs: threads_while_reading.append(torch.get_num_threads()) or read(key, *args, **kwargs)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Prefetcher(pool) as prefetcher:
            prefetcher.submit([PrefetchRequest("a", 0.9, 1)])
            assert prefetcher.wait_until_idle(5)
        assert threads_while_reading == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_demand_waits_for_an_in_flight_prefetch_instead_of_reading_twice():
    source = MemorySource(KEYS)
    pool = trace_pool(source, 2, {"a": 0.9})
    source.gate.clear()
    with Prefetcher(pool) as prefetcher:
        prefetcher.submit([PrefetchRequest("a", 0.9, 1)])
        assert source.reading.wait(5)
        result = {}
        demand = threading.Thread(target=lambda: result.update(a=pool.ensure_resident(["a"])[0]))
        demand.start()
        source.gate.set()
        demand.join(5)
        assert prefetcher.wait_until_idle(5)
    assert torch.equal(result["a"].gate_up, source.weights["a"].gate_up)
    assert source.reads == ["a"]
    assert pool.stats.late_prefetches + pool.stats.hits == 1
    assert pool.stats.prefetch_used_bytes == ONE


def test_a_failed_prefetch_is_counted_and_the_demand_read_raises():
    source = MemorySource(KEYS, failing="c")
    pool = trace_pool(source, 2, {"c": 0.9})
    assert not pool.prefetch("c")
    assert pool.stats.prefetch_errors == 1
    with pytest.raises(ExpertReadError, match="c.safetensors"):
        pool.ensure_resident(["c"])
