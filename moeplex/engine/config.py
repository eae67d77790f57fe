"""EngineConfig: every knob of the serving engine in one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moeplex.offload.config import OffloadConfig
from moeplex.scheduling_choices import POLICIES, PREFILL_MODES


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, how much memory it may use, and which scheduling policy it follows.

    kv_cache_bytes: bytes of key/value caches of all live sequences together.
    backbone_budget_bytes: device bytes for resident backbones; None keeps every variant's backbone.
    max_model_len: longest prompt + completion in tokens; None takes the model's position limit.
    max_pending_requests: running + waiting sequences beyond which new requests are refused.
    use_placement: quantize experts as the store's placement.json (written by `moeplex plan`) says, if it has one;
        resident and offloaded experts alike (offloaded ones are fetched in their precision).
    expert_budget_bytes: device bytes for compute-ready routed experts; None keeps every expert resident. With a
        budget, all variants' experts come from one ExpertPool over the store (each stored expert once), fetched
        by layer as the routers ask for them; at least one expert must fit.
    offload: the other offloading settings (host budget, eviction policy, prediction, prefetch); its device_budget
        is replaced by expert_budget_bytes. None: OffloadConfig's defaults.
    threads: torch.set_num_threads (process-wide) when the engine starts; None leaves torch's default.
    prefill: "separate": a step that can prefill holds only prefills, and decodes run in the steps between (a new
        request waits for no decode; decodes wait a step per prefill; see Scheduler). "mixed": decodes and prefills
        share steps. Separate is the default: on the Zen 4 CPU of docs/benchmarks.md both the throughput and the
        time to first token of `moeplex bench serve` were better with it.
    """

    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 256
    kv_cache_bytes: int = 256 * 2**20
    kv_initial_tokens: int = 16
    backbone_budget_bytes: int | None = None
    policy: str = "fcfs"
    max_pending_requests: int = 256
    max_model_len: int | None = None
    use_placement: bool = True
    expert_budget_bytes: int | None = None
    offload: OffloadConfig | None = None
    threads: int | None = None
    prefill: str = "separate"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got '{self.policy}'")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {', '.join(PREFILL_MODES)}, got '{self.prefill}'")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs")
        if self.kv_initial_tokens < 1 or self.max_pending_requests < 1:
            raise ValueError("kv_initial_tokens and max_pending_requests must be >= 1")
        if self.expert_budget_bytes is not None and self.expert_budget_bytes < 1:
            raise ValueError(f"expert_budget_bytes must be positive, got {self.expert_budget_bytes}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def offload_config(self) -> OffloadConfig | None:
        """The offloading settings in force: None when every expert is resident."""
        if self.expert_budget_bytes is None:
            return None
        return dataclasses.replace(self.offload or OffloadConfig(device_budget=self.expert_budget_bytes), device_budget=self.expert_budget_bytes)
