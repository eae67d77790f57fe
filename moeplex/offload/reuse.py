"""Predicted reuse of each expert: from need probabilities per (layer, expert) to expected uses per layer step."""

from __future__ import annotations

from collections.abc import Hashable

import torch

MIN_PROBABILITY = 1e-3


def layer_distances(num_layers: int, current_layer: int) -> torch.Tensor:
    """Layer steps until each layer runs next [L]: 1 for the next layer, ..., L for the current one (next token)."""
    return (torch.arange(num_layers) - current_layer - 1) % num_layers + 1


def reuse_rate_table(need: torch.Tensor, current_layer: int) -> torch.Tensor:
    """[L, E] expected uses per layer step, from need [L, E]: the probability that (layer, e) is used at its next visit.

    Each visit is taken as an independent draw, so the wait until the next use is the distance to
    the layer's next visit plus a geometric number of whole passes: d + L (1 - p) / p. The rate is its
    inverse (Belady's rule, in expectation: evict the expert needed furthest in the future).
    """
    num_layers = need.shape[0]
    p = need.float().clamp(MIN_PROBABILITY, 1.0)
    wait = layer_distances(num_layers, current_layer)[:, None] + num_layers * (1 - p) / p  # [L, E]
    return 1.0 / wait


def reuse_rates(
    need: torch.Tensor, current_layer: int, positions: dict[Hashable, list[tuple[int, int]]]
) -> dict[Hashable, float]:
    """Expected uses per layer step of each key, summed over the (layer, expert) positions that map to it."""
    rates = reuse_rate_table(need, current_layer).tolist()
    return {key: sum(rates[layer][expert] for layer, expert in where) for key, where in positions.items()}
