"""`OffloadedExperts`: the runtime's expert door over an ExpertPool, with tracing, prediction and prefetch."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager

import torch

from moeplex.model.experts import group_tokens_by_expert
from moeplex.model.ops import swiglu_mlp
from moeplex.offload.forecast import ExpertForecaster, Outlook
from moeplex.offload.policies import TraceAwarePolicy
from moeplex.offload.pool import ExpertPool
from moeplex.offload.prefetcher import Prefetcher, PrefetchRequest
from moeplex.offload.reuse import reuse_rates

# Per layer, the pool key of each expert index (store ids, or (layer, e) for a checkpoint); None for dense layers.
KeyTable = list[list[Hashable] | None]


class OffloadedExperts:
    """ExpertCompute whose weights come from an ExpertPool.

    Per sparse layer: the forecaster traces the router's choice and predicts the next layers; the
    trace-aware policy gets fresh reuse estimates; the layer's experts are made resident (in chunks
    that fit the device budget, so any budget of at least one expert works); the prefetcher gets the
    predicted experts of the next layers; then the experts run on their tokens.
    """

    def __init__(
        self,
        table: KeyTable,
        pool: ExpertPool,
        forecaster: ExpertForecaster | None = None,
        prefetcher: Prefetcher | None = None,
        min_probability: float = 0.8,
    ):
        self.table, self.pool, self.forecaster, self.prefetcher = table, pool, forecaster, prefetcher
        self.min_probability = min_probability
        self.positions: dict[Hashable, list[tuple[int, int]]] = {}
        for layer, keys in enumerate(table):
            for expert, key in enumerate(keys or []):
                self.positions.setdefault(key, []).append((layer, expert))
        largest = max(pool.source.expert_nbytes(key) for key in self.positions)
        if largest > pool.device_budget:
            raise ValueError(f"the device budget ({pool.device_budget} bytes) is smaller than one expert ({largest} bytes)")

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        groups = group_tokens_by_expert(expert_ids)
        outlook = self.forecaster.observe(layer, hidden, expert_ids) if self.forecaster else None
        if outlook is not None and isinstance(self.pool.policy, TraceAwarePolicy):
            self.pool.policy.set_reuse(reuse_rates(outlook.need, layer, self.positions))
        out = torch.zeros_like(hidden)  # [T, H]
        flat_weights = routing_weights.flatten()  # [T*k]
        for index, chunk in enumerate(self._chunks(layer, groups)):
            resident = self.pool.ensure_resident([self.table[layer][expert] for expert, _, _ in chunk])
            if index == 0 and outlook is not None and self.prefetcher is not None:
                self.prefetcher.submit(self._prefetch_requests(outlook))
            for (_, rows, slots), weights in zip(chunk, resident):
                y = swiglu_mlp(hidden[rows], weights.gate_up, weights.down)  # [n, H]
                out.index_add_(0, rows, (y * flat_weights[slots, None]).to(out.dtype))
        return out

    @contextmanager
    def request(self, variant: str) -> Iterator[None]:
        """Everything run inside is traced as one request of `variant` (a batch counts as one request)."""
        if self.forecaster is None:
            yield
            return
        self.forecaster.begin_request(variant)
        try:
            yield
        finally:
            self.forecaster.end_request()

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def _chunks(self, layer: int, groups: list) -> list[list]:
        """The layer's expert groups split so each chunk's experts fit the device budget together."""
        chunks, current, used = [], [], 0
        for group in groups:
            nbytes = self.pool.source.expert_nbytes(self.table[layer][group[0]])
            if current and used + nbytes > self.pool.device_budget:
                chunks.append(current)
                current, used = [], 0
            current.append(group)
            used += nbytes
        return chunks + [current]

    def _prefetch_requests(self, outlook: Outlook) -> list[PrefetchRequest]:
        """Non-resident experts at least min_probability likely in the window; a key shared by positions once, at its best."""
        resident = self.pool.resident_keys()
        best: dict[Hashable, PrefetchRequest] = {}
        for target, distance, row in zip(outlook.targets, outlook.distances, outlook.window):
            for expert in torch.nonzero(row >= self.min_probability).flatten().tolist():
                request = PrefetchRequest(self.table[target][expert], float(row[expert]), distance)
                if request.key in resident:
                    continue
                known = best.get(request.key)
                if known is None or request.order() < known.order():
                    best[request.key] = request
        return list(best.values())
