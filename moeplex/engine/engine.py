"""The step loop: schedule, bring the step's backbones in, run the mixed-variant forward, sample, retire."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeplex.consolidate.family_spec import FREE_SPEC_FIELDS
from moeplex.engine.backbones import BackboneResidency, SwitchStats
from moeplex.engine.config import EngineConfig
from moeplex.engine.experts import BankStepExperts, OffloadedStepExperts, StepExperts
from moeplex.engine.kv_budget import KVCacheBudget, kv_bytes_per_token
from moeplex.engine.model_runner import MixedVariantRunner, VariantGroup
from moeplex.engine.outputs import RequestOutput
from moeplex.engine.policies import policy_by_name
from moeplex.engine.scheduler import ScheduledChunk, Scheduler
from moeplex.engine.sequence import Sequence, TokenLogprob
from moeplex.engine.shared_weights import IdenticalTensorPool
from moeplex.families.base import require_runtime
from moeplex.model.attention import SequenceChunk
from moeplex.model.kv_cache import SequenceKVCache
from moeplex.model.sampling import SamplingParams, sample_token
from moeplex.model.stopping import append_token
from moeplex.offload.pool import ExpertUnavailableError, PoolStats
from moeplex.offload.sources import StoreExpertSource
from moeplex.planner.placement import apply_placement, read_placement_for
from moeplex.quant.formats import DEFAULT_GROUP_SIZE
from moeplex.store.experts import bank_order
from moeplex.store.layout import TOKENIZER
from moeplex.store.reader import StoreReader


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_used_bytes: int
    kv_capacity_bytes: int
    preemptions: int
    aborted: int
    resident_backbones: tuple[str, ...]
    switches: SwitchStats
    expert_bytes: dict[str, int]  # tier -> bytes of resident experts
    failed: int = 0  # sequences ended with an error (an expert they needed could not be read)
    expert_budget_bytes: int | None = None  # device bytes for experts now; None when every expert is resident
    offload: PoolStats | None = None  # the expert pool's counters; None when every expert is resident


def load_store_tokenizer(store: Path):
    """The tokenizer saved with the store, or None when the store has none."""
    folder = store / TOKENIZER
    if not (folder / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class Engine:
    """Serves every variant of a store from one process; not thread-safe (EngineLoop drives it from one thread)."""

    def __init__(self, store: str | Path, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        reader = StoreReader(store)
        require_runtime(reader.family(reader.variants[0]))
        self.variants = reader.variants
        self.base = reader.base
        specs = {variant: reader.spec(variant) for variant in self.variants}
        self.spec = specs[self.variants[0]]
        for variant, spec in specs.items():
            if dataclasses.replace(spec, **{name: getattr(self.spec, name) for name in FREE_SPEC_FIELDS}) != self.spec:
                raise ValueError(f"variant '{variant}' has a different architecture from '{self.variants[0]}'")
        self.max_model_len = config.max_model_len or min(spec.max_position_embeddings for spec in specs.values())
        self.eos_ids = {variant: set(spec.eos_token_ids) for variant, spec in specs.items()}
        self.tokenizer = load_store_tokenizer(reader.path)
        self.placement = None
        self.offloaded: OffloadedStepExperts | None = None
        self.runner = MixedVariantRunner(self.spec, self._make_experts(reader), config.dtype, config.device)
        self.backbones = self._make_residency(reader)
        if self.backbones.capacity == len(self.variants):  # every backbone stays: stack them for variant-batched steps
            self.runner.stack_backbones({variant: self.backbones.resident[variant] for variant in self.variants})
        element_size = torch.empty((), dtype=config.dtype).element_size()
        self.kv_budget = KVCacheBudget(config.kv_cache_bytes, kv_bytes_per_token(self.spec, element_size), config.kv_initial_tokens)
        if self.kv_budget.worst_case_bytes(self.max_model_len) > config.kv_cache_bytes:
            raise ValueError(
                f"kv_cache_bytes={config.kv_cache_bytes} cannot hold one sequence of max_model_len={self.max_model_len} "
                f"(needs {self.kv_budget.worst_case_bytes(self.max_model_len)})"
            )
        self.scheduler = Scheduler(
            policy_by_name(config.policy),
            self.kv_budget,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            max_variants_per_step=self.backbones.capacity,
            separate_prefills=config.prefill == "separate",
        )
        self._sequences: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self.num_aborted = 0
        self.num_failed = 0

    def _make_experts(self, reader: StoreReader) -> StepExperts:
        """Every expert resident in one bank, or (with an expert budget) served from one pool over the store.

        Either way each expert is in the precision the store's placement gives it (when used).
        """
        config = self.config
        tables = {variant: reader.expert_table(variant) for variant in self.variants}
        offload = config.offload_config
        used = bank_order(list(tables.values()))
        if offload is not None:
            self.placement = read_placement_for(reader.path, used) if config.use_placement else None
            precision_of, group_size = (self.placement.precision, self.placement.group_size) if self.placement else ({}, DEFAULT_GROUP_SIZE)
            source = StoreExpertSource(reader.path, reader.manifest, self.spec, config.dtype, precision_of, group_size)
            self.offloaded = OffloadedStepExperts(source, self.spec, tables, offload, config.device)
            return self.offloaded
        bank = reader.load_expert_bank(used, self.spec, config.dtype, config.device)
        self.placement = apply_placement(reader.path, bank) if config.use_placement else None
        return BankStepExperts(bank, tables, config.device)

    def _make_residency(self, reader: StoreReader) -> BackboneResidency:
        identical = IdenticalTensorPool()

        def load(variant: str):
            return identical.share(reader.load_backbone(variant, self.config.dtype, self.config.device))

        budget = self.config.backbone_budget_bytes
        if budget is None:
            return BackboneResidency(load, len(self.variants), preload=self.variants)
        backbone_bytes = load(self.variants[0]).nbytes
        capacity = min(len(self.variants), max(1, budget // backbone_bytes))
        return BackboneResidency(load, capacity, preload=self.variants)

    def add_request(self, variant: str, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None) -> int:
        """Queue a sequence; returns its id. Raises ValueError for an unknown variant or a prompt too long."""
        if variant not in self.variants:
            raise ValueError(f"unknown variant '{variant}' (known: {', '.join(self.variants)})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens"
            )
        if any(not 0 <= t < self.spec.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.spec.vocab_size})")
        seq = Sequence(next(self._ids), variant, prompt_ids, params, logprobs)
        self._sequences[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, seq_id: int, error: str | None = None) -> RequestOutput | None:
        """Cancel a sequence and free its cache; its final output, or None if unknown.

        finish_reason is 'abort', or 'error' when an error message is given (the output carries it).
        """
        seq = self._sequences.pop(seq_id, None)
        if seq is None:
            return None
        seq.completion.finish_reason = "abort" if error is None else "error"
        seq.error = error
        if error is None:
            self.num_aborted += 1
        else:
            self.num_failed += 1
        self.scheduler.finish(seq)
        return RequestOutput.of(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_unfinished(self) -> int:
        return len(self._sequences)

    def step(self) -> list[RequestOutput]:
        """One engine step; outputs of every sequence that got a new token or finished."""
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        backbones = self.backbones.ensure(plan.variants)
        self._prefetch_next_variant()
        groups, group_chunks = [], []
        for variant in self.runner.ordered(plan.variants):
            chunks = [c for c in plan.chunks if c.seq.variant == variant]
            groups.append(VariantGroup(variant, backbones[variant], self._step_tokens(chunks), [self._cache_chunk(c) for c in chunks]))
            group_chunks.append(chunks)
        if self.offloaded is not None:
            self.offloaded.begin_step({variant: backbones[variant] for variant in plan.variants})
        try:
            logits = self.runner.forward(groups)
        except ExpertUnavailableError as exc:
            outputs = self._fail_sequences_needing(exc, [chunk for chunks in group_chunks for chunk in chunks])
        else:
            outputs = self._sample_step(group_chunks, logits)
        if self.offloaded is not None:
            self.offloaded.end_idle({seq.variant for seq in self._sequences.values()})
        return outputs

    def _fail_sequences_needing(self, exc: ExpertUnavailableError, chunks: list[ScheduledChunk]) -> list[RequestOutput]:
        """End with an error the sequences whose tokens needed the unreadable expert; the rest of the step runs again.

        Nothing of the failed step is kept: no cache length moved and no token was counted as computed.
        """
        ends = list(itertools.accumulate(chunk.num_tokens for chunk in chunks))  # flat token rows, chunks in step order
        failing = {chunks[bisect.bisect_right(ends, row)].seq.seq_id for row in exc.token_rows}
        failing = failing or {chunk.seq.seq_id for chunk in chunks}
        message = f"an expert this request needs could not be read: {exc}"
        return [self.abort(seq_id, error=message) for seq_id in sorted(failing)]

    def _sample_step(self, group_chunks: list[list[ScheduledChunk]], logits: list[torch.Tensor]) -> list[RequestOutput]:
        outputs = []
        for chunks, group_logits in zip(group_chunks, logits):
            for chunk, row in zip(chunks, group_logits):
                sampled = chunk.completes_prompt
                self.scheduler.computed(chunk)
                if sampled:
                    outputs.append(self._sample(chunk.seq, row))
        return outputs

    def stats(self) -> EngineStats:
        pool_stats, expert_bytes = self.runner.experts.snapshot()
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_used_bytes=self.kv_budget.used_bytes,
            kv_capacity_bytes=self.kv_budget.capacity_bytes,
            preemptions=self.scheduler.num_preemptions,
            aborted=self.num_aborted,
            resident_backbones=tuple(self.backbones.resident),
            switches=dataclasses.replace(self.backbones.stats),
            expert_bytes=expert_bytes,
            failed=self.num_failed,
            expert_budget_bytes=None if self.offloaded is None else self.offloaded.device_budget,
            offload=pool_stats,
        )

    def set_expert_budget(self, nbytes: int) -> None:
        """Grow or shrink the device bytes for experts, between steps; running sequences go on.

        ValueError when every expert is resident (the engine was started without an expert budget) or
        when nbytes cannot hold one expert.
        """
        if self.offloaded is None:
            raise ValueError("every expert is resident: start the engine with an expert budget to change it live")
        self.offloaded.set_device_budget(nbytes)

    def close(self) -> None:
        self.backbones.close()
        if self.offloaded is not None:
            self.offloaded.close()

    def _prefetch_next_variant(self) -> None:
        """Start loading the backbone of the first queued sequence whose variant is not resident."""
        for seq in self.scheduler.admission_order():
            if seq.variant not in self.backbones.resident:
                self.backbones.prefetch(seq.variant)
                return

    def _step_tokens(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        tokens = []
        for chunk in chunks:
            start = chunk.seq.num_computed
            tokens += chunk.seq.token_ids[start : start + chunk.num_tokens]
        return torch.tensor(tokens, dtype=torch.long)

    def _cache_chunk(self, chunk: ScheduledChunk) -> SequenceChunk:
        seq = chunk.seq
        if seq.cache is None:
            capacity = self.kv_budget.capacity_tokens[seq.seq_id]
            seq.cache = SequenceKVCache(self.spec, self.config.dtype, self.config.device, capacity)
        return SequenceChunk(seq.cache, seq.num_computed, chunk.num_tokens)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> RequestOutput:
        token = sample_token(logits, seq.params, seq.generator)
        if seq.times.first_token is None:
            seq.times.first_token = time.perf_counter()
        generated = len(seq.completion.token_ids)
        append_token(seq.completion, seq.params, token, self.eos_ids[seq.variant], self.tokenizer)
        if seq.logprobs is not None and len(seq.completion.token_ids) > generated:
            seq.token_logprobs.append(token_logprob(logits, token, seq.logprobs))
        if seq.completion.finish_reason is not None:
            self._sequences.pop(seq.seq_id, None)
            self.scheduler.finish(seq)
        return RequestOutput.of(seq)


def token_logprob(logits: torch.Tensor, token: int, num_top: int) -> TokenLogprob:
    """The model's log-probability of token and of its num_top most likely tokens, from raw logits [V]."""
    logprobs = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logprobs, min(num_top, logprobs.shape[-1]))
    return TokenLogprob(token, float(logprobs[token]), dict(zip(top.indices.tolist(), top.values.tolist())))
