"""The engine's routed-expert doors: a step's tokens of every variant in, their weighted expert outputs out.

Both doors map each variant's router choice (layer, e) to a stored expert by store id, so tokens of
different variants routed to the same stored expert run as one matmul. `BankStepExperts` holds every
expert resident (the store's ExpertBank); `OffloadedStepExperts` serves them from one ExpertPool under
a device budget, with per-variant tracing and prediction whose prefetch requests are joined.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeplex.model.spec import ModelSpec
from moeplex.model.weights import Backbone
from moeplex.offload.config import OffloadConfig
from moeplex.offload.forecast import ExpertForecaster
from moeplex.offload.host_execution import make_host_execution
from moeplex.offload.loading import load_store_library, make_forecaster, make_pool
from moeplex.offload.offloaded import Forecast, PooledExperts, key_positions
from moeplex.offload.pool import PoolStats
from moeplex.offload.prefetcher import Prefetcher
from moeplex.offload.sources import StoreExpertSource
from moeplex.store.experts import BANK_LAYER, ExpertBank
from moeplex.store.manifest import ExpertTable

ExpertRows = list[torch.Tensor | None]  # per layer, the row (into one list of stored experts) of each expert index [E]


@dataclass
class RoutedTokens:
    """One variant group's tokens at a sparse layer: router input [n, H], chosen experts [n, k], their weights [n, k]."""

    variant: str
    hidden: torch.Tensor
    expert_ids: torch.Tensor
    routing_weights: torch.Tensor


class StepExperts(Protocol):
    def __call__(self, layer: int, routed: list[RoutedTokens]) -> torch.Tensor:
        """Weighted expert outputs [sum of n, H] of every group's tokens, in group order."""
        ...

    def snapshot(self) -> tuple[PoolStats | None, dict[str, int]]:
        """Pool counters (None when every expert is resident) and bytes of experts per tier."""
        ...


def expert_rows(table: ExpertTable, row_of: dict[str, int], device) -> ExpertRows:
    return [None if ids is None else torch.tensor([row_of[i] for i in ids], dtype=torch.long, device=device) for ids in table]


def joined(layer: int, routed: list[RoutedTokens], rows: dict[str, ExpertRows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], rows [T, k], routing weights [T, k]) of all groups, each choice mapped to its stored expert's row."""
    hidden = torch.cat([r.hidden for r in routed])
    expert_rows = torch.cat([rows[r.variant][layer][r.expert_ids] for r in routed])
    return hidden, expert_rows, torch.cat([r.routing_weights for r in routed])


class BankStepExperts:
    """Every stored expert the variants use resident in one ExpertBank."""

    def __init__(self, bank: ExpertBank, tables: dict[str, ExpertTable], device):
        self.bank = bank
        self.rows = {variant: expert_rows(table, bank.row_of, device) for variant, table in tables.items()}

    def __call__(self, layer: int, routed: list[RoutedTokens]) -> torch.Tensor:
        return self.bank.compute(BANK_LAYER, *joined(layer, routed, self.rows))

    def snapshot(self) -> tuple[PoolStats | None, dict[str, int]]:
        """No pool counters; the bank's bytes, all on the device."""
        return None, {"device": self.bank.nbytes}


class OffloadedStepExperts:
    """Every variant's experts from one ExpertPool over the store, keyed by store expert id.

    A variant that shares an expert shares its resident copy. Each variant has its own forecaster
    (its routers drive look-ahead; all share the store's trace library); a variant's requests from the
    step it joins until it has no unfinished sequence are traced as one request. Per layer each group
    is observed, the reuse estimates are summed and the prefetch requests joined over variants (only
    traced while the budget holds every expert), and then the step's tokens run through
    `PooledExperts` (chunks that fit the budget).
    """

    def __init__(self, source: StoreExpertSource, spec: ModelSpec, tables: dict[str, ExpertTable], config: OffloadConfig, device):
        self.spec, self.tables, self.config, self.source = spec, tables, config, source
        self.keys = list(dict.fromkeys(i for table in tables.values() for ids in table if ids for i in ids))
        row_of = {key: row for row, key in enumerate(self.keys)}
        self.rows = {variant: expert_rows(table, row_of, device) for variant, table in tables.items()}
        self.positions = {variant: key_positions(table) for variant, table in tables.items()}
        self.disk_bytes = sum(source.manifest.experts[key].bytes for key in self.keys)
        pool = make_pool(source, config, device)
        host_execution = make_host_execution(config.host_execution, device, source.dtype, config.host_budget)
        self.pooled = PooledExperts(pool, self.keys, Prefetcher(pool) if config.prefetch else None, config.min_probability, host_execution)
        self.library = load_store_library(source.root, spec, config) if config.prediction != "none" else None
        self.forecasters: dict[str, ExpertForecaster] = {}
        self.tracing: set[str] = set()

    @property
    def pool(self):
        return self.pooled.pool

    def begin_step(self, backbones: dict[str, Backbone]) -> None:
        """The step's variants and their backbones: start tracing the variants not traced yet."""
        if self.library is None:
            return
        for variant, backbone in backbones.items():
            if variant not in self.forecasters:
                self.forecasters[variant] = make_forecaster(self.spec, backbone, self.config, self.library)
            if variant not in self.tracing:
                self.forecasters[variant].begin_request(variant)
                self.tracing.add(variant)

    def end_idle(self, busy: set[str]) -> None:
        """Close the traced request of every variant that has no unfinished sequence left."""
        for variant in sorted(self.tracing - busy):
            self.forecasters[variant].end_request()
            self.tracing.discard(variant)

    def __call__(self, layer: int, routed: list[RoutedTokens]) -> torch.Tensor:
        predict = self.pooled.needs_forecasts
        forecasts = []
        for r in routed:
            if r.variant in self.forecasters:
                outlook = self.forecasters[r.variant].observe(layer, r.hidden, r.expert_ids, predict)
                if outlook is not None:
                    forecasts.append(Forecast(self.tables[r.variant], self.positions[r.variant], outlook))
        prefetch = self.pooled.plan(layer, forecasts) if forecasts else []
        hidden, rows, weights = joined(layer, routed, self.rows)
        return self.pooled.run(hidden, rows, weights, self.keys, prefetch)

    def after_layer(self, layer: int, residuals: dict[str, torch.Tensor]) -> None:
        """Layer `layer` has run: each variant re-predicts its window's layers from its rows of the residual; prefetch for them."""
        forecasts = []
        for variant, residual in residuals.items():
            outlook = self.forecasters[variant].revise(layer, residual) if variant in self.forecasters else None
            if outlook is not None:
                forecasts.append(Forecast(self.tables[variant], self.positions[variant], outlook))
        self.pooled.resubmit(forecasts)

    @property
    def device_budget(self) -> int:
        return self.pool.device_budget

    def set_device_budget(self, nbytes: int) -> None:
        """Grow or shrink the device bytes for experts between steps; ValueError below one expert."""
        self.pooled.set_device_budget(nbytes)

    def snapshot(self) -> tuple[PoolStats | None, dict[str, int]]:
        """The pool's counters and the bytes per tier: device, host, and disk (the files of every expert the variants use)."""
        stats, tiers = self.pool.snapshot()
        return stats, tiers | {"disk": self.disk_bytes}

    def close(self) -> None:
        self.end_idle(set())
        self.pooled.close()
