"""Scheduling policies, the KV budget and the scheduler, tested without a model."""

from __future__ import annotations

import pytest

from moeplex.engine.config import EngineConfig
from moeplex.engine.kv_budget import KVCacheBudget
from moeplex.engine.policies import FCFSPolicy, VariantFairPolicy, policy_by_name
from moeplex.engine.scheduler import Scheduler
from moeplex.engine.sequence import Sequence, SequenceStatus
from moeplex.model.sampling import SamplingParams

BYTES_PER_TOKEN = 10


def make_seq(seq_id: int, variant: str = "a", prompt_len: int = 4, arrival: float | None = None) -> Sequence:
    seq = Sequence(seq_id, variant, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=8, temperature=0))
    seq.times.arrival = float(seq_id) if arrival is None else arrival
    return seq


def make_scheduler(policy="fcfs", kv_tokens=1000, max_num_seqs=8, max_tokens=64, max_variants=None, separate_prefills=False) -> Scheduler:
    budget = KVCacheBudget(kv_tokens * BYTES_PER_TOKEN, BYTES_PER_TOKEN, initial_tokens=4)
    return Scheduler(policy_by_name(policy), budget, max_num_seqs, max_tokens, max_variants, separate_prefills)


def run_step(scheduler: Scheduler) -> dict[int, int]:
    """Schedule one step and pretend the model ran it: a token is generated after each completed prompt."""
    plan = scheduler.schedule()
    for chunk in plan.chunks:
        sampled = chunk.completes_prompt
        scheduler.computed(chunk)
        if sampled:
            chunk.seq.completion.token_ids.append(7)
    return {chunk.seq.seq_id: chunk.num_tokens for chunk in plan.chunks}


def test_fcfs_orders_by_arrival_and_preempts_the_newest():
    seqs = [make_seq(i, arrival=a) for i, a in enumerate([3.0, 1.0, 2.0])]
    policy = FCFSPolicy()
    assert [s.seq_id for s in policy.admission_order(seqs, {})] == [1, 2, 0]
    assert policy.preemption_victim(seqs, {}).seq_id == 0


def test_variant_fair_interleaves_variants_least_served_first():
    seqs = [make_seq(0, "a"), make_seq(1, "a"), make_seq(2, "a"), make_seq(3, "b"), make_seq(4, "c")]
    policy = VariantFairPolicy()
    order = [s.seq_id for s in policy.admission_order(seqs, {"a": 0, "b": 50, "c": 10})]
    assert order == [0, 4, 3, 1, 2]
    assert policy.preemption_victim(seqs, {"a": 100, "b": 5}).seq_id == 2
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        policy_by_name("lifo")


def test_prefill_is_chunked_under_the_token_budget_and_decode_joins_between_steps():
    scheduler = make_scheduler(max_tokens=8)
    long_seq, short_seq = make_seq(0, prompt_len=12), make_seq(1, prompt_len=3)
    scheduler.add(long_seq)
    assert run_step(scheduler) == {0: 8}
    scheduler.add(short_seq)
    assert run_step(scheduler) == {0: 4, 1: 3}  # the rest of the long prompt, the short one joins
    assert run_step(scheduler) == {0: 1, 1: 1}  # both decode
    assert long_seq.completion.token_ids == [7, 7] and long_seq.status is SequenceStatus.RUNNING


def test_separate_prefills_gives_prompts_steps_of_their_own_and_decodes_resume_between():
    scheduler = make_scheduler(max_tokens=8, separate_prefills=True)
    first, long_seq, short_seq = make_seq(0, "a", prompt_len=3), make_seq(1, "b", prompt_len=9), make_seq(2, "c", prompt_len=3)
    scheduler.add(first)
    assert run_step(scheduler) == {0: 3}
    assert run_step(scheduler) == {0: 1}  # nothing to prefill: decode
    scheduler.add(long_seq)
    scheduler.add(short_seq)
    assert run_step(scheduler) == {1: 8}  # prefill only: first's decode waits
    assert run_step(scheduler) == {1: 1, 2: 3}  # the prompt's last token (not a decode), then the admission
    assert run_step(scheduler) == {0: 1, 1: 1, 2: 1}  # every prompt done: all decode together
    assert scheduler.served_tokens == {"a": 5, "b": 10, "c": 4}


def test_separate_prefills_falls_back_to_a_mixed_step_that_preempts_when_a_prompt_cannot_grow():
    scheduler = make_scheduler(kv_tokens=16, max_tokens=8, separate_prefills=True)
    decoding, chunked = make_seq(0, prompt_len=3), make_seq(1, prompt_len=14)
    scheduler.add(decoding)
    assert run_step(scheduler) == {0: 3}
    scheduler.add(chunked)
    assert run_step(scheduler) == {1: 8}  # caches: 4 (rounded up) + 8 tokens
    step = run_step(scheduler)  # the rest of the prompt needs a 14-token cache: only after preempting the newest, itself
    assert step == {0: 1} and scheduler.num_preemptions == 1 and chunked.status is SequenceStatus.WAITING


def test_kv_pressure_preempts_the_newest_and_it_recomputes_later():
    scheduler = make_scheduler(kv_tokens=16, max_tokens=64)
    old, new = make_seq(0, prompt_len=7), make_seq(1, prompt_len=7)
    scheduler.add(old)
    scheduler.add(new)
    assert run_step(scheduler) == {0: 7, 1: 7}  # caches of 7 + 7 tokens
    step = run_step(scheduler)  # each needs 8 tokens -> 14-token caches: only one fits
    assert step == {0: 1} and scheduler.num_preemptions == 1
    assert new.status is SequenceStatus.WAITING and new.num_computed == 0 and new.cache is None
    assert scheduler.kv_budget.capacity_tokens == {0: 14}
    assert run_step(scheduler) == {0: 1}  # new's recomputation (8 tokens) does not fit beside old's 14
    scheduler.finish(old)
    assert run_step(scheduler) == {1: 8}  # prompt and its generated token recomputed
    scheduler.finish(new)
    assert scheduler.kv_budget.used_bytes == 0 and not scheduler.has_work


def test_admission_stops_at_a_variant_beyond_the_per_step_limit():
    scheduler = make_scheduler(max_variants=1)
    for seq in (make_seq(0, "a"), make_seq(1, "b"), make_seq(2, "a")):
        scheduler.add(seq)
    assert run_step(scheduler) == {0: 4}  # b may not join a's step, and a's later request may not overtake it
    scheduler.finish(scheduler.running[0])
    assert run_step(scheduler) == {1: 4}


def test_sequence_slots_and_budget_accounting_follow_the_cache_growth():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add(make_seq(i, prompt_len=5))
    assert set(run_step(scheduler)) == {0, 1}
    assert scheduler.kv_budget.capacity_tokens == {0: 5, 1: 5}
    run_step(scheduler)
    assert scheduler.kv_budget.capacity_tokens == {0: 10, 1: 10}  # doubled, as SequenceKVCache.reserve does
    assert scheduler.served_tokens["a"] == 12


def test_engine_config_names_the_scheduling_choices_it_refuses():
    with pytest.raises(ValueError, match="prefill must be one of separate, mixed, got 'first'"):
        EngineConfig(prefill="first")
    with pytest.raises(ValueError, match="policy must be one of fcfs, variant-fair, got 'lifo'"):
        EngineConfig(policy="lifo")
