"""One request's sequence inside the engine: tokens, sampling state, KV cache, progress and timestamps."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from moeplex.model.kv_cache import SequenceKVCache
from moeplex.model.sampling import SamplingParams, make_generator
from moeplex.model.stopping import Completion


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SequenceTimes:
    """Monotonic timestamps (time.perf_counter) of a sequence's life; None until reached."""

    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the most likely tokens' (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float]


class Sequence:
    """A prompt of one variant being completed; the scheduler moves it between waiting and running.

    num_computed counts the tokens whose keys and values are in `cache`; preemption drops the cache
    and sets it to 0, so the prompt and the tokens generated so far are recomputed on readmission.
    """

    def __init__(self, seq_id: int, variant: str, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None):
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token")
        self.seq_id, self.variant, self.params, self.logprobs = seq_id, variant, params, logprobs
        self.completion = Completion(list(prompt_ids))
        self.generator: torch.Generator | None = make_generator(params)
        self.status = SequenceStatus.WAITING
        self.num_computed = 0
        self.cache: SequenceKVCache | None = None
        self.token_logprobs: list[TokenLogprob] = []
        self.times = SequenceTimes()
        self.error: str | None = None  # why it ended with finish_reason 'error'

    @property
    def prompt_ids(self) -> list[int]:
        return self.completion.prompt_ids

    @property
    def token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.completion.prompt_ids + self.completion.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.completion.prompt_ids) + len(self.completion.token_ids)

    @property
    def tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """The next step computes one generated token; otherwise prompt tokens (or a recomputation) are left."""
        return self.tokens_to_compute == 1 and self.num_tokens > len(self.completion.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, {self.variant}, {self.status.value}, {self.num_computed}/{self.num_tokens})"
