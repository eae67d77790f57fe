"""RequestOutput: an immutable snapshot of a sequence after a step, safe to hand to another thread."""

from __future__ import annotations

from dataclasses import dataclass

from moeplex.engine.sequence import Sequence, SequenceTimes, TokenLogprob


@dataclass(frozen=True)
class RequestOutput:
    seq_id: int
    variant: str
    num_prompt_tokens: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    logprobs: tuple[TokenLogprob, ...]
    times: SequenceTimes
    error: str | None = None  # with finish_reason "error": what failed (e.g. an expert file that cannot be read)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @staticmethod
    def of(seq: Sequence) -> "RequestOutput":
        completion = seq.completion
        times = SequenceTimes(seq.times.arrival, seq.times.first_scheduled, seq.times.first_token, seq.times.finished)
        return RequestOutput(
            seq.seq_id,
            seq.variant,
            len(completion.prompt_ids),
            tuple(completion.token_ids),
            completion.text,
            completion.finish_reason,
            tuple(seq.token_logprobs),
            times,
            seq.error,
        )
