"""Quality of a consolidated or merged model against the original: perplexity, KL and greedy agreement."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.eval.perplexity import DEFAULT_WINDOW, runtime_logits, windowed_perplexity
from moeplex.model.runtime import MoEModel


@dataclass(frozen=True)
class Agreement:
    kl: float  # mean KL(original || candidate) of next-token distributions, nats
    greedy_agreement: float  # fraction of positions with the same argmax


def perplexity(model: MoEModel, ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> float:
    return windowed_perplexity(runtime_logits(model), ids, window)


def agreement(original: MoEModel, candidate: MoEModel, ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> Agreement:
    """Compare next-token distributions window by window on the same tokens."""
    score_original, score_candidate = runtime_logits(original), runtime_logits(candidate)
    kl_sum, agree, count = 0.0, 0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window]
        p_log = F.log_softmax(score_original(chunk), dim=-1)
        q_log = F.log_softmax(score_candidate(chunk), dim=-1)
        kl_sum += float((p_log.exp() * (p_log - q_log)).sum())
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        count += chunk.numel()
    return Agreement(kl_sum / count, agree / count)
