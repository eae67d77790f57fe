"""Perplexity through the moeplex runtime (and through transformers, as the reference)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moeplex.model.attention import SequenceChunk
from moeplex.model.runtime import MoEModel

DEFAULT_WINDOW = 256

# Window scorer: token ids [n] -> float32 logits [n, V].
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def windowed_perplexity(logits_of: LogitsFn, token_ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, each scored from an empty context."""
    if token_ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    total_nll, total_tokens = 0.0, 0
    for start in range(0, token_ids.numel() - 1, window):
        chunk = token_ids[start : start + window + 1]
        if chunk.numel() < 2:
            break
        logits = logits_of(chunk[:-1])  # [n, V]
        total_nll += float(F.cross_entropy(logits.float(), chunk[1:], reduction="sum"))
        total_tokens += chunk.numel() - 1
    return math.exp(total_nll / total_tokens)


def runtime_logits(model: MoEModel) -> LogitsFn:
    """Scorer that runs a window through our runtime with a fresh cache."""

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        cache = model.new_cache(capacity=ids.numel())
        return model.forward(ids, [SequenceChunk(cache, 0, ids.numel())], all_logits=True)

    return logits_of


def transformers_logits(hf_model) -> LogitsFn:
    """Scorer that runs a window through a transformers causal LM."""

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return hf_model(ids[None]).logits[0].float()

    return logits_of
