"""Agreement of a consolidated or merged model with the original: KL and greedy agreement of its predictions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.eval.perplexity import DEFAULT_WINDOW, PredictFn, token_windows


@dataclass(frozen=True)
class Agreement:
    kl: float  # mean KL(original || candidate) of the predicted-token distributions, nats
    greedy_agreement: float  # fraction of positions with the same argmax


def agreement(original: PredictFn, candidate: PredictFn, ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> Agreement:
    """Compare the two models' predictions window by window on the same tokens."""
    kl_sum, agree, count = 0.0, 0, 0
    for chunk in token_windows(ids, window):
        p_log = F.log_softmax(original(chunk)[0], dim=-1)
        q_log = F.log_softmax(candidate(chunk)[0], dim=-1)
        kl_sum += float((p_log.exp() * (p_log - q_log)).sum())
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        count += p_log.shape[0]
    return Agreement(kl_sum / count, agree / count)
