"""The serving engine with offloaded experts: one pool for all variants, greedy outputs as with every expert resident, read errors."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from moeplex.engine import Engine, EngineConfig
from moeplex.errors import ExpertReadError
from moeplex.offload.config import OffloadConfig
from moeplex.planner.placement import Placement, write_placement
from moeplex.quant.formats import PRECISIONS
from moeplex.quant.store_copies import write_quantized_copies
from moeplex.store import StoreReader
from tests import test_engine
from tests.test_engine import GREEDY, make_requests, run_engine
from tests.test_engine_store import one_torch_thread  # noqa: F401 (autouse fixture)

SETTINGS = {
    "moeplex": OffloadConfig(device_budget=1),  # trace-aware policy, combined prediction, prefetch
    "lru": OffloadConfig(device_budget=1, policy="lru", prediction="none", prefetch=False),
    "lookahead": OffloadConfig(device_budget=1, prediction="lookahead", window=3, min_probability=0.2),
    "host-execution": OffloadConfig(device_budget=1, host_budget=2**30, policy="lru", prediction="none", prefetch=False, host_execution="always"),
}
any_store, store = test_engine.any_store, test_engine.store  # the engine tests' fixtures: Mixtral and Qwen2-MoE stores; a Mixtral store


def expert_bytes(store) -> int:
    return StoreReader(store).spec("base").expert_numel * 4


def offloaded_engine(store, budget_experts: int, settings: OffloadConfig = SETTINGS["moeplex"], **overrides) -> Engine:
    config = EngineConfig(
        dtype=torch.float32, max_num_batched_tokens=24, max_num_seqs=8,
        expert_budget_bytes=budget_experts * expert_bytes(store), offload=settings, **overrides,
    )
    return Engine(store, config)


def resident_tokens(store, requests) -> list[list[int]]:
    return run_engine(Engine(store, EngineConfig(dtype=torch.float32, max_num_batched_tokens=24, max_num_seqs=8)), requests)


@pytest.mark.parametrize("budget_experts", [1, 3])  # one expert in all; about one per sparse layer
def test_mixed_variant_greedy_equals_the_resident_engine(any_store, budget_experts):
    requests = make_requests(any_store)
    expected = resident_tokens(any_store, requests)
    engine = offloaded_engine(any_store, budget_experts)
    calls = []
    run = engine.offloaded.pooled.run
    engine.offloaded.pooled.run = lambda hidden, *rest: calls.append(hidden.shape[0]) or run(hidden, *rest)
    steps = []
    forward = engine.runner.forward
    engine.runner.forward = lambda groups: steps.append(len(groups)) or forward(groups)
    try:
        assert run_engine(engine, requests, join_after=2) == expected
        assert max(steps) == 3, "steps mixed all three variants"
        assert len(calls) == sum(engine.spec.sparse_layers) * len(steps), "one pooled dispatch per sparse layer for the whole step"
        pool = engine.offloaded.pool
        assert len(pool.resident_keys()) <= budget_experts and pool.stats.evictions > 0
        assert engine.kv_budget.used_bytes == 0 and engine.num_unfinished == 0
        stats = engine.stats()
        assert stats.offload.misses > 0 and stats.offload.bytes_read["disk"] > 0
        assert stats.expert_bytes["device"] <= budget_experts * expert_bytes(any_store)
        assert engine.offloaded.tracing == set() and len(engine.offloaded.library) >= 3, "one traced request per variant"
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["lru", "lookahead", "host-execution"])
def test_other_offload_settings_keep_greedy_outputs(store, name):
    requests = make_requests(store)
    engine = offloaded_engine(store, 2, SETTINGS[name], policy="variant-fair")
    try:
        assert run_engine(engine, requests) == resident_tokens(store, requests)
        assert (engine.stats().offload.host_executions > 0) == (name == "host-execution")
    finally:
        engine.close()


def test_variants_share_one_resident_copy_of_a_shared_expert(store):
    reader = StoreReader(store)
    tables = {v: reader.expert_table(v) for v in reader.variants}
    engine = offloaded_engine(store, 100)  # room for everything: each stored expert is read once
    try:
        stored = {i for table in tables.values() for ids in table if ids for i in ids}
        assert sorted(engine.offloaded.keys) == sorted(stored)
        assert len(stored) < sum(len(ids) for table in tables.values() for ids in table if ids)
        reads = []
        read = engine.offloaded.source.read
        engine.offloaded.source.read = lambda key: reads.append(key) or read(key)
        run_engine(engine, make_requests(store, per_variant=3))
        engine.offloaded.pooled.prefetcher.wait_until_idle()
        stats = engine.stats()
        assert len(reads) == len(set(reads)) == len(engine.offloaded.pool.resident_keys()) and stats.offload.evictions == 0
        assert stats.expert_bytes["device"] == len(reads) * expert_bytes(store)
        assert stats.expert_bytes["disk"] == sum(reader.manifest.experts[i].bytes for i in stored)
    finally:
        engine.close()


def test_prediction_runs_only_while_the_budget_cannot_hold_every_expert(store):
    requests = make_requests(store)
    expected = resident_tokens(store, requests)
    engine = offloaded_engine(store, 100)  # room for everything
    planned = []
    plan = engine.offloaded.pooled.plan
    engine.offloaded.pooled.plan = lambda layer, forecasts: planned.append(len(forecasts)) or plan(layer, forecasts)
    try:
        assert run_engine(engine, requests) == expected
        assert planned == [] and len(engine.offloaded.library) >= 3, "traced, but nothing predicted or prefetched"
        engine.set_expert_budget(2 * expert_bytes(store))
        assert run_engine(engine, requests) == expected
        assert planned and all(count > 0 for count in planned), "a budget below the experts turns prediction on"
        assert engine.stats().offload.evictions > 0
    finally:
        engine.close()


def test_each_variant_revises_its_next_layer_from_its_own_rows_of_the_residual(store, monkeypatch):
    from moeplex.offload.forecast import ExpertForecaster

    requests = make_requests(store)
    expected = resident_tokens(store, requests)
    revised, revise = [], ExpertForecaster.revise

    def counted(forecaster, layer, residual):
        outlook = revise(forecaster, layer, residual)
        revised.append(outlook is not None)
        return outlook

    monkeypatch.setattr(ExpertForecaster, "revise", counted)
    engine = offloaded_engine(store, 2)
    door, residual_shapes = engine.offloaded, []
    after_layer = door.after_layer
    door.after_layer = lambda layer, residuals: residual_shapes.append({v: r.shape for v, r in residuals.items()}) or after_layer(layer, residuals)
    try:
        assert run_engine(engine, requests) == expected
    finally:
        engine.close()
    hidden = StoreReader(store).spec("base").hidden_size
    assert any(len(step) > 1 for step in residual_shapes), "mixed steps hand every variant its own rows"
    assert all(shape[1] == hidden for step in residual_shapes for shape in step.values())
    assert any(revised), "next-layer predictions were revised"


def test_a_budget_below_one_expert_is_refused(store):
    with pytest.raises(ValueError, match="smaller than one expert"):
        Engine(store, EngineConfig(dtype=torch.float32, expert_budget_bytes=expert_bytes(store) - 1))


def python_only_expert(store) -> str:
    reader = StoreReader(store)
    others = {i for v in ("base", "cpp") for ids in reader.expert_table(v) if ids for i in ids}
    (only,) = {i for ids in reader.expert_table("python") if ids for i in ids} - others
    return only


def test_an_unreadable_expert_fails_only_the_sequences_that_need_it(store):
    broken = python_only_expert(store)
    requests = make_requests(store, per_variant=2)
    expected = resident_tokens(store, requests)
    engine = offloaded_engine(store, 3)
    source = engine.offloaded.source
    read = source.read

    def failing_read(key):
        if key == broken:
            raise ExpertReadError(f"expert {key}: cannot read {store / 'experts' / key} (injected)")
        return read(key)

    source.read = failing_read
    try:
        outputs = {}
        ids = [engine.add_request(v, p, GREEDY) for v, p in requests]
        while engine.has_work:
            for output in engine.step():
                if output.finished:
                    outputs[output.seq_id] = output
                    assert engine.kv_budget.capacity_tokens.get(output.seq_id) is None, "a finished sequence's cache is freed"
        failed = [i for i in ids if outputs[i].finish_reason == "error"]
        assert failed and all(requests[ids.index(i)][0] == "python" for i in failed)
        assert all(broken in outputs[i].error and "injected" in outputs[i].error for i in failed)
        for seq_id, (variant, _), tokens in zip(ids, requests, expected):
            if seq_id not in failed:
                assert list(outputs[seq_id].token_ids) == tokens, variant
        assert engine.stats().failed == len(failed) and engine.kv_budget.used_bytes == 0
        source.read = read  # the file is readable again: the same request now succeeds
        retry = ids.index(failed[0])
        assert run_engine(engine, [requests[retry]]) == [expected[retry]]
    finally:
        engine.close()



def test_changing_the_budget_between_steps_keeps_every_sequence_and_its_tokens(store):
    requests = make_requests(store)
    expected = resident_tokens(store, requests)
    engine = offloaded_engine(store, budget_experts=4)
    budgets = iter([1, 30, 2, 6, 1, 12] * 10)
    resident_after_change = []

    def change_budget(engine):
        experts = next(budgets)
        engine.set_expert_budget(experts * expert_bytes(store))
        resident_after_change.append(len(engine.offloaded.pool.resident_keys()) <= experts)

    try:
        assert run_engine(engine, requests, check=change_budget) == expected
        assert all(resident_after_change), "a shrink evicts down to the new budget at once"
        assert engine.num_failed == 0 and engine.kv_budget.used_bytes == 0
        with pytest.raises(ValueError, match="smaller than one expert"):
            engine.set_expert_budget(expert_bytes(store) - 1)
    finally:
        engine.close()
    resident = Engine(store, EngineConfig(dtype=torch.float32))
    with pytest.raises(ValueError, match="every expert is resident"):
        resident.set_expert_budget(expert_bytes(store))


@pytest.mark.parametrize("with_copies", [False, True], ids=["quantized-on-read", "stored-copies"])
def test_offloaded_experts_run_in_the_placements_precisions(store, tmp_path, with_copies):
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    expert_ids = sorted(StoreReader(copy).manifest.referenced_expert_ids())
    rng = random.Random(7)
    precision_of = {expert_id: rng.choice(PRECISIONS) for expert_id in expert_ids}
    write_placement(copy, Placement(precision_of, group_size=32))
    if with_copies:
        assert write_quantized_copies(copy, precision_of, group_size=32, progress=False) > 0
    requests = make_requests(copy)
    bf16 = dict(dtype=torch.bfloat16, max_num_batched_tokens=24, max_num_seqs=8)
    expected = run_engine(Engine(copy, EngineConfig(**bf16)), requests)  # resident, in the placement's precisions
    one_bf16_expert = StoreReader(copy).spec("base").expert_numel * 2
    engine = Engine(copy, EngineConfig(**bf16, expert_budget_bytes=2 * one_bf16_expert, offload=SETTINGS["lru"]))
    source = engine.offloaded.source
    copies_read = []
    if with_copies:
        read = source.copies.read
        source.copies.read = lambda key, *args, **kwargs: copies_read.append(key) or read(key, *args, **kwargs)
    try:
        assert run_engine(engine, requests) == expected
        sizes = {p: {source.expert_nbytes(i) for i, q in precision_of.items() if q == p} for p in PRECISIONS}
        assert all(len(s) == 1 for s in sizes.values())  # one size per precision
        assert max(sizes["int4"]) < max(sizes["int8"]) < max(sizes["bf16"])
        assert engine.stats().offload.misses > 0
        quantized_reads = [key for key in copies_read if precision_of[key] != "bf16"]
        assert bool(quantized_reads) == with_copies and len(quantized_reads) == len(copies_read)
    finally:
        engine.close()
