"""Precision and recall of the predicted expert sets, by layer distance, scored as the batch runs."""

from __future__ import annotations

from collections import defaultdict

import torch


class PredictionScorer:
    """Compares each prediction (experts at least `threshold` likely at a target layer) with what the router chose there."""

    def __init__(self, num_layers: int, threshold: float):
        self.num_layers, self.threshold = num_layers, threshold
        self.counts: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])  # distance -> [true pos, false pos, false neg]
        self.reset()

    def reset(self) -> None:
        """A new request starts: predictions made for the previous one are dropped."""
        self._pending: dict[tuple[int, int], list[tuple[int, set[int]]]] = defaultdict(list)
        self._step, self._last_layer = 0, self.num_layers

    def observe(self, layer: int, expert_ids: torch.Tensor) -> None:
        """The router chose expert_ids [T, k] at layer; score the predictions made for it."""
        if layer <= self._last_layer:
            self._step += 1
        self._last_layer = layer
        actual = set(torch.unique(expert_ids).tolist())
        for distance, predicted in self._pending.pop((self._step, layer), []):
            counts = self.counts[distance]
            counts[0] += len(predicted & actual)
            counts[1] += len(predicted - actual)
            counts[2] += len(actual - predicted)

    def expect(self, layer: int, targets: list[int], distances: list[int], window: torch.Tensor) -> None:
        """Predictions made at layer: window [W, E] need probabilities for targets, `distances` layer steps ahead."""
        for target, distance, row in zip(targets, distances, window):
            step = self._step + (layer + distance) // self.num_layers
            predicted = set(torch.nonzero(row >= self.threshold).flatten().tolist())
            self._pending[(step, target)].append((distance, predicted))

    def revise(self, layer: int, target: int, distance: int, row: torch.Tensor) -> None:
        """Replace the prediction made at layer for target, `distance` steps ahead, with row [E] (a later, better one)."""
        step = self._step + (layer + distance) // self.num_layers
        pending = self._pending[(step, target)]
        predicted = set(torch.nonzero(row >= self.threshold).flatten().tolist())
        pending[:] = [entry for entry in pending if entry[0] != distance] + [(distance, predicted)]

    def report(self) -> dict[int, dict[str, float]]:
        """{distance: {"precision", "recall", "scored"}} over every prediction scored so far."""
        result = {}
        for distance, (tp, fp, fn) in sorted(self.counts.items()):
            result[distance] = {
                "precision": tp / (tp + fp) if tp + fp else 0.0,
                "recall": tp / (tp + fn) if tp + fn else 0.0,
                "scored": tp + fn,
            }
        return result
