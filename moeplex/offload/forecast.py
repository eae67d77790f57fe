"""Per layer: trace the router's choice, predict the next layers, and estimate every expert's next need."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplex.offload.evaluation import PredictionScorer
from moeplex.offload.prediction import CombinedPredictor, batch_need
from moeplex.offload.tracing import ActivationTracer


@dataclass
class Outlook:
    """What the forecaster expects after `layer` routed."""

    layer: int
    targets: list[int]  # the next sparse layers, nearest first (wrapping into the next token)
    distances: list[int]  # layer steps from `layer` to each target
    window: torch.Tensor  # [W, E] probability that the batch needs each expert at each target
    need: torch.Tensor  # [L, E] the same at every layer's next visit (trace matching outside the window)


class ExpertForecaster:
    """Feeds the tracer and asks the predictor, once per sparse layer; optionally scores its own predictions."""

    def __init__(
        self,
        sparse_layers: tuple[bool, ...],
        tracer: ActivationTracer,
        predictor: CombinedPredictor,
        window: int = 2,
        scorer: PredictionScorer | None = None,
    ):
        self.sparse = [layer for layer, is_sparse in enumerate(sparse_layers) if is_sparse]
        self.num_layers = len(sparse_layers)
        self.tracer, self.predictor, self.window, self.scorer = tracer, predictor, window, scorer
        self._last: Outlook | None = None  # the outlook of the layer that routed last, until the next one routes

    def begin_request(self, variant: str) -> None:
        self.tracer.begin(variant)
        self._last = None
        if self.scorer is not None:
            self.scorer.reset()

    def end_request(self) -> None:
        self.tracer.end()

    def observe(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, predict: bool = True) -> Outlook | None:
        """hidden [T, H] is the layer's router input, expert_ids [T, k] its choice.

        With predict=False (the caller has no use for a forecast) only the trace is kept and None is
        returned, unless predictions are being scored.
        """
        self.tracer.record(layer, expert_ids)
        self._last = None
        if not predict and self.scorer is None:
            return None
        targets, distances = self._targets(layer)
        same_token = [layer + d < self.num_layers for d in distances]
        window = self.predictor.predict(hidden, targets, same_token)  # [W, E]
        need = self._baseline_need(hidden.shape[0])  # [L, E]
        need[targets] = window
        if self.scorer is not None:
            self.scorer.observe(layer, expert_ids)
            self.scorer.expect(layer, targets, distances, window)
        self._last = Outlook(layer, targets, distances, window, need)
        return self._last

    def revise(self, layer: int, residual: torch.Tensor) -> Outlook | None:
        """Layer `layer` has run and residual [T, H] enters the next one: the outlook with its window re-predicted from it.

        Only the window's layers of this token are (the next token's depend on a token not chosen yet),
        and only when the predictor can read a residual; else None.
        """
        outlook = self._last
        if outlook is None or outlook.layer != layer or not self.predictor.reads_residuals:
            return None
        rows = [i for i, distance in enumerate(outlook.distances) if layer + distance < self.num_layers]
        if not rows:
            return None
        targets = [outlook.targets[i] for i in rows]
        revised = self.predictor.predict_from_residual(residual, targets)  # [len(rows), E]
        outlook.window[rows] = revised
        outlook.need[targets] = revised
        if self.scorer is not None:
            for i, row in zip(rows, revised):
                self.scorer.revise(layer, outlook.targets[i], outlook.distances[i], row)
        return outlook

    def _targets(self, layer: int) -> tuple[list[int], list[int]]:
        position = self.sparse.index(layer)
        count = min(self.window, len(self.sparse))
        targets = [self.sparse[(position + step) % len(self.sparse)] for step in range(1, count + 1)]
        return targets, [(target - layer - 1) % self.num_layers + 1 for target in targets]

    def _baseline_need(self, tokens: int) -> torch.Tensor:
        """[L, E] from trace matching, or uniform (k of E) without it."""
        matcher = self.predictor.matcher
        if matcher is None:
            shape = self.tracer.matrix.shape
            return batch_need(torch.full(shape, self.predictor.lookahead.top_k / shape[1]), tokens)
        return batch_need(matcher.per_token(), tokens)
