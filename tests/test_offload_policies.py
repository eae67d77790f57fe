"""Eviction policies and reuse estimates, without a model."""

import pytest
import torch

from moeplex.offload.policies import LFUPolicy, LRUPolicy, TraceAwarePolicy, make_policy
from moeplex.offload.reuse import layer_distances, reuse_rate_table, reuse_rates


def test_lru_evicts_least_recent_and_never_a_protected_key():
    policy = LRUPolicy()
    for key in ["a", "b", "c", "a"]:
        policy.record_access(key)
    assert policy.choose_victim(["a", "b", "c"]) == "b"
    assert policy.choose_victim(["a", "b", "c"], protected={"b"}) == "c"
    assert policy.choose_victim(["a", "b"], protected={"a", "b"}) is None


def test_lfu_evicts_least_frequent_counts_survive_eviction_ties_go_to_least_recent():
    policy = LFUPolicy()
    for key in ["a", "a", "a", "b", "b", "c", "d"]:
        policy.record_access(key)
    assert policy.choose_victim(["a", "b", "c", "d"]) == "c"  # c and d used once; c less recently
    policy.forget("a")
    policy.record_access("a")
    assert policy.choose_victim(["a", "b"]) == "b"  # a's count (4) survived its eviction
    assert policy.choose_victim(["a", "b", "c"], protected={"c"}) == "b"


def test_trace_aware_evicts_lowest_reuse_times_transfer_cost():
    costs = {"a": 1.0, "b": 1.0, "c": 10.0}
    policy = TraceAwarePolicy(transfer_cost=costs.__getitem__)
    for key in ["a", "b", "c"]:
        policy.record_access(key)
    policy.set_reuse({"a": 0.5, "b": 0.2, "c": 0.03})
    assert policy.choose_victim(["a", "b", "c"]) == "b"  # c is rarely reused but 10x dearer to fetch again
    assert policy.choose_victim(["a", "c"]) == "c"
    assert policy.choose_victim(["a", "b", "c"], protected={"b"}) == "c"
    policy.set_reuse({"a": 0.5})
    assert policy.choose_victim(["a", "b"]) == "b"  # no estimate: lowest


def test_trace_aware_computes_reuse_given_as_a_function_once_and_only_when_it_ranks():
    policy = TraceAwarePolicy()
    for key in ["a", "b"]:
        policy.record_access(key)
    calls = []
    policy.set_reuse(lambda: calls.append(1) or {"a": 0.1, "b": 0.4})
    assert calls == [], "nothing ranked yet"
    assert policy.choose_victim(["a", "b"]) == "a" and policy.choose_victim(["b"]) == "b"
    assert calls == [1], "computed once for every ranking until the next estimates"
    policy.set_reuse(lambda: {"a": 0.9})
    assert policy.choose_victim(["a", "b"]) == "b"


def test_make_policy_by_name():
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("lfu"), LFUPolicy)
    assert make_policy("trace", lambda key: 3.0).transfer_cost("x") == 3.0
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("fifo")


def test_layer_distances_put_the_current_layer_last():
    assert layer_distances(4, 1).tolist() == [3, 4, 1, 2]


def test_reuse_rate_grows_with_need_and_nearness():
    generator = torch.Generator().manual_seed(11)
    need = torch.rand(4, 6, generator=generator) * 0.8 + 0.1  # [L, E]
    rates = reuse_rate_table(need, current_layer=1)
    layer, expert = 2, int(torch.argmin(need[2]))
    likelier = need.clone()
    likelier[layer, expert] = 0.99
    assert reuse_rate_table(likelier, 1)[layer, expert] > rates[layer, expert]
    same_need = torch.full((4, 6), float(need[0, 0]))
    by_layer = reuse_rate_table(same_need, current_layer=1)[:, 0]
    assert by_layer[2] > by_layer[3] > by_layer[0] > by_layer[1]  # next layer first, current layer last


def test_reuse_rates_sum_over_positions_of_a_shared_key():
    generator = torch.Generator().manual_seed(12)
    need = torch.rand(3, 4, generator=generator) * 0.9 + 0.05
    table = reuse_rate_table(need, 0)
    rates = reuse_rates(need, 0, {"shared": [(1, 2), (2, 3)], "own": [(0, 1)]})
    assert rates["shared"] == pytest.approx(float(table[1, 2] + table[2, 3]))
    assert rates["own"] == pytest.approx(float(table[0, 1]))
