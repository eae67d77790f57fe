"""Continuous batching: which sequences compute how many tokens in the next step, under token and KV budgets."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from moeplex.engine.kv_budget import KVCacheBudget
from moeplex.engine.policies import SchedulingPolicy
from moeplex.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """num_tokens tokens of seq, starting at seq.num_computed, computed in this step."""

    seq: Sequence
    num_tokens: int

    @property
    def completes_prompt(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a new token is sampled after it."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(chunk.seq.variant for chunk in self.chunks))

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)


class Scheduler:
    """Running sequences first (decode, then the rest of chunked prefills), then admissions in policy order.

    Every step computes at most max_num_batched_tokens tokens; a prompt longer than what is left is
    prefilled in chunks over several steps, and new requests join between decode steps. When a running
    sequence's cache cannot grow within the KV budget, the policy's victim is preempted: its cache is
    dropped and it waits to be recomputed. Admission stops at the first waiting sequence that does not
    fit (tokens, KV bytes, sequence slots, or one more variant than max_variants_per_step allows), so
    the policy's order is never overtaken and nobody starves.

    separate_prefills: a step that can prefill (the rest of chunked prompts, then admissions) holds only
    prefills, and running sequences decode in the steps between, as vLLM's V0 scheduler did by default.
    A new request then waits for no other sequence's decode, and a prefill step of one variant runs
    that variant's backbone and experts alone; the decoding sequences wait one step per prefill.
    False: decodes and prefills share a step, as vLLM's V1 scheduler does.
    """

    def __init__(
        self,
        policy: SchedulingPolicy,
        kv_budget: KVCacheBudget,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_variants_per_step: int | None = None,
        separate_prefills: bool = False,
    ):
        self.policy, self.kv_budget = policy, kv_budget
        self.separate_prefills = separate_prefills
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_variants_per_step = max_variants_per_step
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.served_tokens: Counter[str] = Counter()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admission_order(self) -> list[Sequence]:
        return self.policy.admission_order(self.waiting, self.served_tokens)

    def schedule(self) -> StepPlan:
        plan = self._prefill_plan() if self.separate_prefills else StepPlan()
        if not plan.chunks:
            plan = self._mixed_plan()
        for chunk in plan.chunks:
            self.served_tokens[chunk.seq.variant] += chunk.num_tokens
        return plan

    def _prefill_plan(self) -> StepPlan:
        """Prefills only: the rest of running sequences' chunked prompts, then admissions; empty when none can run.

        A running prompt whose cache cannot grow ends the plan (the mixed plan then preempts as it must).
        """
        plan = StepPlan()
        token_budget = self.max_num_batched_tokens
        for seq in self.running:
            if seq.is_decoding or token_budget == 0:
                continue
            num_tokens = min(seq.tokens_to_compute, token_budget)
            if not self.kv_budget.try_reserve(seq.seq_id, seq.num_computed + num_tokens):
                return StepPlan()
            plan.chunks.append(ScheduledChunk(seq, num_tokens))
            token_budget -= num_tokens
        self._admit(plan, token_budget)
        return plan

    def _mixed_plan(self) -> StepPlan:
        """Every running sequence (decodes and chunked prompts alike, preempting when the cache cannot grow), then admissions."""
        plan = StepPlan()
        token_budget = self.max_num_batched_tokens
        queue = list(self.running)
        while queue and token_budget > 0:
            seq = queue.pop(0)
            num_tokens = min(seq.tokens_to_compute, token_budget)
            while not self.kv_budget.try_reserve(seq.seq_id, seq.num_computed + num_tokens):
                victim = self.policy.preemption_victim([seq, *queue], self.served_tokens)
                self._preempt(victim, plan)
                if victim is seq:
                    break
                queue.remove(victim)
            else:
                plan.chunks.append(ScheduledChunk(seq, num_tokens))
                token_budget -= num_tokens
        if not plan.preempted:
            self._admit(plan, token_budget)
        return plan

    def _admit(self, plan: StepPlan, token_budget: int) -> None:
        variants = {seq.variant for seq in self.running}
        for seq in self.admission_order():
            if token_budget == 0 or len(self.running) >= self.max_num_seqs:
                return
            if seq.variant not in variants and self.max_variants_per_step is not None and len(variants) >= self.max_variants_per_step:
                return
            num_tokens = min(seq.tokens_to_compute, token_budget)
            if not self.kv_budget.try_reserve(seq.seq_id, num_tokens):
                return
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.times.first_scheduled is None:
                seq.times.first_scheduled = time.perf_counter()
            variants.add(seq.variant)
            plan.chunks.append(ScheduledChunk(seq, num_tokens))
            token_budget -= num_tokens

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._drop_cache(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        plan.preempted.append(seq)
        self.num_preemptions += 1

    def computed(self, chunk: ScheduledChunk) -> None:
        """Record that the chunk's tokens are now in the sequence's cache."""
        chunk.seq.num_computed += chunk.num_tokens

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or cancelled sequence wherever it is and free its cache."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_cache(seq)
        seq.status = SequenceStatus.FINISHED
        seq.times.finished = time.perf_counter()

    def _drop_cache(self, seq: Sequence) -> None:
        self.kv_budget.release(seq.seq_id)
        seq.cache = None
        seq.num_computed = 0
