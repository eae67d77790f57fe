"""Perplexity through the moeplex runtime (and through transformers, as the reference), and KL divergence to a reference model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from moeplex.model.attention import SequenceChunk
from moeplex.model.runtime import MoEModel

DEFAULT_WINDOW = 256

# Window scorer: token ids [n] -> float32 logits [n, V].
LogitsFn = Callable[[torch.Tensor], torch.Tensor]

# Window predictions: a window of token ids -> (float32 logits [m, V], the m tokens they predict).
PredictFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def causal_predictions(logits_of: LogitsFn) -> PredictFn:
    """A causal LM predicts every next token of the window from the ones before it."""
    return lambda chunk: (logits_of(chunk[:-1]), chunk[1:])


def token_windows(token_ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> Iterator[torch.Tensor]:
    """Consecutive windows of window + 1 tokens, each starting at the last token of the one before."""
    if token_ids.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    for start in range(0, token_ids.numel() - 1, window):
        yield token_ids[start : start + window + 1]


def predictions_perplexity(predict: PredictFn, token_ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> float:
    """exp(mean NLL) of every prediction the model makes over the windows, each scored from an empty context."""
    total_nll, total_tokens = 0.0, 0
    for chunk in token_windows(token_ids, window):
        logits, targets = predict(chunk)
        total_nll += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def windowed_perplexity(logits_of: LogitsFn, token_ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, each scored from an empty context."""
    return predictions_perplexity(causal_predictions(logits_of), token_ids, window)


def window_log_probs(logits_of: LogitsFn, token_ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> list[torch.Tensor]:
    """Per window, the model's next-token log-probabilities [m, V] (float32): the reference of `windowed_ppl_and_kl`."""
    return [torch.log_softmax(logits_of(chunk[:-1]).float(), dim=-1) for chunk in token_windows(token_ids, window)]


def windowed_ppl_and_kl(
    logits_of: LogitsFn, token_ids: torch.Tensor, reference: list[torch.Tensor], window: int = DEFAULT_WINDOW
) -> tuple[float, float]:
    """(perplexity, mean KL(reference || model) per predicted token, in nats) in one pass over the windows.

    reference: `window_log_probs` of the reference model on the same tokens and windows.
    """
    total_nll, total_kl, total_tokens = 0.0, 0.0, 0
    for chunk, reference_log_probs in zip(token_windows(token_ids, window), reference, strict=True):
        log_probs = torch.log_softmax(logits_of(chunk[:-1]).float(), dim=-1)  # [m, V]
        targets = chunk[1:]
        total_nll -= float(log_probs.gather(1, targets[:, None]).sum())
        total_kl += float(F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="sum"))
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens), total_kl / total_tokens


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
