"""Backbone residency: which variants' backbones are on the device, LRU eviction, background loading of the next one."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from moeplex.cores import one_omp_thread_for_this_thread
from moeplex.model.weights import Backbone


@dataclass
class SwitchStats:
    """switches: backbones brought in while a step waited; switch_seconds: how long steps waited for them.

    load_seconds: time spent reading backbones (foreground and background); prefetch_hits: switches
    served by a background load that had started before the step needed it.
    """

    switches: int = 0
    switch_seconds: float = 0.0
    load_seconds: float = 0.0
    prefetch_hits: int = 0

    @property
    def hidden_fraction(self) -> float:
        """Share of loading time that background loading kept off the step loop."""
        return 0.0 if self.load_seconds == 0 else max(0.0, 1.0 - self.switch_seconds / self.load_seconds)


class BackboneResidency:
    """Keeps at most `capacity` backbones resident, least recently used evicted first.

    `prefetch(variant)` starts loading a backbone in a worker thread (host staging; on CPU the device
    tier is RAM, so the staged copy is the resident one) while the current step computes; `ensure` then
    only waits for whatever part of that load is left.
    """

    def __init__(self, load: Callable[[str], Backbone], capacity: int, preload: Iterable[str] = ()):
        if capacity < 1:
            raise ValueError("backbone capacity must be at least 1")
        self._load, self.capacity = load, capacity
        self.resident: OrderedDict[str, Backbone] = OrderedDict()
        self.stats = SwitchStats()
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backbone-prefetch",
                                          initializer=one_omp_thread_for_this_thread)  # loads must not slow the engine's ops
        self._staged: tuple[str, Future] | None = None
        for variant in list(preload)[:capacity]:
            self.resident[variant] = self._timed_load(variant)

    def ensure(self, variants: list[str]) -> dict[str, Backbone]:
        """Backbones of every variant of a step, resident (at most `capacity` variants per step)."""
        if len(variants) > self.capacity:
            raise ValueError(f"a step needs {len(variants)} backbones but only {self.capacity} fit the budget")
        for variant in variants:
            if variant in self.resident:
                self.resident.move_to_end(variant)
            else:
                self._switch_in(variant, keep=set(variants))
        return {variant: self.resident[variant] for variant in variants}

    def prefetch(self, variant: str) -> None:
        """Start loading variant's backbone in the background unless it is resident or already staged."""
        if variant in self.resident or (self._staged is not None and self._staged[0] == variant):
            return
        if self._staged is not None and not self._staged[1].done():
            return
        self._staged = (variant, self._worker.submit(self._timed_load, variant))

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _switch_in(self, variant: str, keep: set[str]) -> None:
        started = time.perf_counter()
        if self._staged is not None and self._staged[0] == variant:
            backbone = self._staged[1].result()
            self._staged = None
            self.stats.prefetch_hits += 1
        else:
            backbone = self._timed_load(variant)
        while len(self.resident) >= self.capacity:
            evictable = next(v for v in self.resident if v not in keep)
            del self.resident[evictable]
        self.resident[variant] = backbone
        self.stats.switches += 1
        self.stats.switch_seconds += time.perf_counter() - started

    def _timed_load(self, variant: str) -> Backbone:
        started = time.perf_counter()
        backbone = self._load(variant)
        with self._lock:
            self.stats.load_seconds += time.perf_counter() - started
        return backbone
