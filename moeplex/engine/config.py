"""EngineConfig: every knob of the serving engine in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass

import torch

POLICIES = ("fcfs", "variant-fair")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches, how much memory it may use, and which scheduling policy it follows.

    kv_cache_bytes: bytes of key/value caches of all live sequences together.
    backbone_budget_bytes: device bytes for resident backbones; None keeps every variant's backbone.
    max_model_len: longest prompt + completion in tokens; None takes the model's position limit.
    max_pending_requests: running + waiting sequences beyond which new requests are refused.
    use_placement: quantize experts as the store's placement.json (written by `moeplex plan`) says, if it has one.
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

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got '{self.policy}'")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs")
        if self.kv_initial_tokens < 1 or self.max_pending_requests < 1:
            raise ValueError("kv_initial_tokens and max_pending_requests must be >= 1")
