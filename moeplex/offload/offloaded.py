"""Routed experts run from an ExpertPool: `PooledExperts` (shared dispatch, prefetch planning) and `OffloadedExperts`.

`PooledExperts` is the one dispatch path over a pool: tokens grouped by pool key, experts that the
host-execution policy keeps on the host tier run there, the other keys are made resident in chunks
that fit the device budget, then each expert runs once on all of its tokens. It
also turns forecasts into reuse estimates for the trace-aware policy and into prefetch requests. The
single-model door (`OffloadedExperts`) and the serving engine's mixed-variant door
(`moeplex.engine.experts.OffloadedStepExperts`) both use it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moeplex.model.experts import group_tokens_by_expert
from moeplex.offload.config import DEFAULT_MIN_PROBABILITY
from moeplex.offload.forecast import ExpertForecaster, Outlook
from moeplex.offload.host_execution import HostExecutionPolicy, NeverOnHost
from moeplex.offload.policies import TraceAwarePolicy
from moeplex.offload.pool import ExpertPool, ExpertUnavailableError, chunks_that_fit
from moeplex.offload.prefetcher import Prefetcher, PrefetchRequest
from moeplex.offload.reuse import reuse_rates

# Per layer, the pool key of each expert index (store ids, or (layer, e) for a checkpoint); None for dense layers.
KeyTable = list[list[Hashable] | None]
Positions = dict[Hashable, list[tuple[int, int]]]


def key_positions(table: KeyTable) -> Positions:
    """The (layer, expert index) positions of each key of a table."""
    positions: Positions = {}
    for layer, keys in enumerate(table):
        for expert, key in enumerate(keys or []):
            positions.setdefault(key, []).append((layer, expert))
    return positions


def add_weighted(out: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> None:
    """out[rows] += y [n, H] times each row's routing weight [n]."""
    out.index_add_(0, rows, (y * weights[:, None]).to(out.dtype))


@dataclass
class Forecast:
    """One variant's outlook after a layer routed, with the table and positions that turn it into pool keys."""

    table: KeyTable
    positions: Positions
    outlook: Outlook


class PooledExperts:
    """Runs routed tokens on experts held in an ExpertPool; optionally owns a prefetcher over it."""

    def __init__(
        self,
        pool: ExpertPool,
        keys: Sequence[Hashable],
        prefetcher: Prefetcher | None = None,
        min_probability: float = DEFAULT_MIN_PROBABILITY,
        host_execution: HostExecutionPolicy | None = None,
    ):
        self.pool, self.prefetcher, self.min_probability = pool, prefetcher, min_probability
        self.host_execution = host_execution or NeverOnHost()
        self.largest_expert = max(pool.source.expert_nbytes(key) for key in keys)
        self.total_bytes = sum(pool.source.expert_nbytes(key) for key in keys)
        self._check_budget(pool.device_budget)

    @property
    def needs_forecasts(self) -> bool:
        """False while the device budget holds every expert: nothing is ever evicted, so prediction and prefetching gain nothing."""
        return self.total_bytes > self.pool.device_budget

    def _check_budget(self, nbytes: int) -> None:
        if nbytes < self.largest_expert:
            raise ValueError(f"the device budget ({nbytes} bytes) is smaller than one expert ({self.largest_expert} bytes)")

    def set_device_budget(self, nbytes: int) -> None:
        """Change the pool's device budget between forward passes; ValueError below one expert."""
        self._check_budget(nbytes)
        self.pool.set_device_budget(nbytes)

    def plan(self, layer: int, forecasts: list[Forecast]) -> list[PrefetchRequest]:
        """Give the trace-aware policy fresh reuse estimates; the prefetch requests the forecasts call for."""
        self.update_reuse(layer, forecasts)
        return self.prefetch_requests(forecasts)

    def update_reuse(self, layer: int, forecasts: list[Forecast]) -> None:
        """Hand the trace-aware policy each key's reuse rate, summed over variants (nothing for other policies).

        The rates are computed when the policy first ranks keys after this, from the forecasts' need
        tables as they are then (a revision of the next layer after this layer included).
        """
        if not isinstance(self.pool.policy, TraceAwarePolicy):
            return

        def summed_rates() -> dict[Hashable, float]:  # run by the policy only when it has to rank
            rates: dict[Hashable, float] = {}
            for forecast in forecasts:
                for key, rate in reuse_rates(forecast.outlook.need, layer, forecast.positions).items():
                    rates[key] = rates.get(key, 0.0) + rate
            return rates

        self.pool.policy.set_reuse(summed_rates)

    def prefetch_requests(self, forecasts: list[Forecast]) -> list[PrefetchRequest]:
        """Non-resident keys the forecasts' windows call for; a key's chance is the union over variants,
        1 - prod(1 - p), at its nearest distance."""
        if self.prefetcher is None:
            return []
        missing: dict[Hashable, tuple[float, int]] = {}  # key -> (probability that no variant needs it, distance)
        for forecast in forecasts:
            for request in self._variant_requests(forecast):
                absent, distance = missing.get(request.key, (1.0, request.distance))
                missing[request.key] = (absent * (1.0 - request.probability), min(distance, request.distance))
        resident = self.pool.resident_keys()
        return [PrefetchRequest(key, 1.0 - absent, distance) for key, (absent, distance) in missing.items() if key not in resident]

    def resubmit(self, forecasts: list[Forecast]) -> None:
        """Replace the prefetch queue with what revised forecasts call for (nothing while the budget holds every expert)."""
        if forecasts and self.prefetcher is not None and self.needs_forecasts:
            self.prefetcher.submit(self.prefetch_requests(forecasts))

    def run(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor, keys: Sequence[Hashable], prefetch: list[PrefetchRequest]
    ) -> torch.Tensor:
        """hidden [T, H] through experts expert_ids [T, k] (indices into keys), weighted by routing_weights [T, k].

        The prefetch requests go to the prefetcher once the first chunk is resident. A key that cannot
        be read raises ExpertUnavailableError with `token_rows`, the rows of hidden that needed it.
        """
        groups = group_tokens_by_expert(expert_ids)
        out = torch.zeros_like(hidden)  # [T, H]
        flat_weights = routing_weights.flatten()  # [T*k]
        groups = self._run_on_host(hidden, keys, groups, flat_weights, out)
        for index, chunk in enumerate(self._chunks(keys, groups)):
            try:
                resident = self.pool.ensure_resident([keys[expert] for expert, _, _ in chunk])
            except ExpertUnavailableError as exc:
                exc.token_rows = sorted({row for expert, rows, _ in groups if keys[expert] == exc.key for row in rows.tolist()})
                raise
            if index == 0 and self.prefetcher is not None:
                self.prefetcher.submit(prefetch)
            for (_, rows, slots), weights in zip(chunk, resident):
                add_weighted(out, rows, weights(hidden[rows]), flat_weights[slots])
        return out

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def _run_on_host(self, hidden, keys, groups: list, flat_weights: torch.Tensor, out: torch.Tensor) -> list:
        """Run the groups whose expert the policy keeps on the host tier there (adding into out); the other groups."""
        if isinstance(self.host_execution, NeverOnHost):
            return groups
        rest = []
        for expert, rows, slots in groups:
            key = keys[expert]
            weights = None
            if self.host_execution.run_on_host(self.pool.source.expert_nbytes(key), len(rows)):
                weights = self.pool.host_copy(key, len(rows))
            if weights is None:
                rest.append((expert, rows, slots))
                continue
            add_weighted(out, rows, weights(hidden[rows].to(weights.device)).to(out.device), flat_weights[slots])
        return rest

    def _chunks(self, keys: Sequence[Hashable], groups: list) -> list[list]:
        """The expert groups split so each chunk's experts fit the device budget together."""
        return chunks_that_fit(groups, lambda group: self.pool.source.expert_nbytes(keys[group[0]]), self.pool.device_budget)

    def _variant_requests(self, forecast: Forecast) -> list[PrefetchRequest]:
        """Experts at least min_probability likely in the window; a key shared by positions once, at its best."""
        outlook, best = forecast.outlook, {}
        for target, distance, row in zip(outlook.targets, outlook.distances, outlook.window.tolist()):
            for expert, probability in enumerate(row):
                if probability < self.min_probability:
                    continue
                request = PrefetchRequest(forecast.table[target][expert], probability, distance)
                known = best.get(request.key)
                if known is None or request.order() < known.order():
                    best[request.key] = request
        return list(best.values())


class OffloadedExperts:
    """ExpertCompute of one model whose weights come from an ExpertPool.

    Per sparse layer: the forecaster traces the router's choice and (unless the device budget holds
    every expert) predicts the next layers; the trace-aware policy gets fresh reuse estimates; the
    layer's experts are made resident (in chunks that fit the device budget, so any budget of at least
    one expert works); the prefetcher gets the predicted experts of the next layers; then the experts
    run on their tokens.
    """

    def __init__(
        self,
        table: KeyTable,
        pool: ExpertPool,
        forecaster: ExpertForecaster | None = None,
        prefetcher: Prefetcher | None = None,
        min_probability: float = DEFAULT_MIN_PROBABILITY,
        host_execution: HostExecutionPolicy | None = None,
    ):
        self.table, self.forecaster = table, forecaster
        self.positions = key_positions(table)
        self.pooled = PooledExperts(pool, list(self.positions), prefetcher, min_probability, host_execution)

    @property
    def pool(self) -> ExpertPool:
        return self.pooled.pool

    @property
    def prefetcher(self) -> Prefetcher | None:
        return self.pooled.prefetcher

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        prefetch = []
        if self.forecaster is not None:
            outlook = self.forecaster.observe(layer, hidden, expert_ids, predict=self.pooled.needs_forecasts)
            if outlook is not None:
                prefetch = self.pooled.plan(layer, [Forecast(self.table, self.positions, outlook)])
        return self.pooled.run(hidden, expert_ids, routing_weights, self.table[layer], prefetch)

    def after_layer(self, layer: int, residual: torch.Tensor) -> None:
        """Layer `layer` has run: re-predict the window's layers of this token from the residual [T, H]; prefetch for them.

        Only the prefetch queue is re-planned: the trace-aware policy computes its reuse rates lazily from
        the same outlook's need table, so it sees the revision without computing them again.
        """
        outlook = self.forecaster.revise(layer, residual) if self.forecaster is not None else None  # None unless layer predicted
        if outlook is not None:
            self.pooled.resubmit([Forecast(self.table, self.positions, outlook)])

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
        self.pooled.close()
