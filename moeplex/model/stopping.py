"""A completion in progress and when it stops: end-of-sequence tokens, stop strings, max_tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeplex.model.sampling import SamplingParams


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or stop string) or "length"


def append_token(completion: Completion, params: SamplingParams, token: int, eos_ids: set[int], tokenizer) -> None:
    """Add one sampled token; set finish_reason when it ends the completion (stop strings need the tokenizer)."""
    if token in eos_ids and not params.ignore_eos:
        completion.finish_reason = "stop"
        return
    completion.token_ids.append(token)
    if tokenizer is not None:
        completion.text = tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        cut = _first_stop(completion.text, params.stop)
        if cut is not None:
            completion.text = completion.text[:cut]
            completion.finish_reason = "stop"
            return
    if len(completion.token_ids) >= params.max_tokens:
        completion.finish_reason = "length"


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(s) for s in stops if s and s in text]
    return min(positions) if positions else None
