"""Replays recorded expert routing through a timed model of one disk and a device cache: on-demand LRU against an oracle.

The oracle knows the future: it evicts the expert used furthest ahead (Belady's rule) and, as each layer
routes, queues the reads of exactly the experts that the next `window` layers will use. No predictor
foresees more and Belady's rule reads least, so its speed over LRU's is what perfect prediction gives a
pool that reads ahead this way at a budget (a cleverer order of reads might gain a little more; no
system beats the fully resident speed). `moeplex bench offload` replays the measured
requests' routing with costs it measured (docs/offloading.md).

The model: layers run in order; a layer spends `layer_seconds` before its router picks experts, then
waits for each picked expert to be resident and spends `expert_seconds` on it. Reads go to one disk,
one at a time in the order issued, `nbytes / read_bytes_per_second` each. An expert being read holds its
room in the cache. A layer whose experts do not fit together runs them in chunks that do, as the pool
does, and an expert of the running chunk is never evicted.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from moeplex.offload.pool import chunks_that_fit

Step = Sequence[Sequence[Hashable]]  # one forward pass: the keys each layer uses, layer by layer


@dataclass(frozen=True)
class ReplayCosts:
    layer_seconds: float  # a layer's work besides its experts (attention, norms, router)
    expert_seconds: float  # one expert's work on one step's tokens
    read_bytes_per_second: float  # the disk, one read at a time


@dataclass(frozen=True)
class Replayed:
    step_seconds: tuple[float, ...]  # each timed step's time, in order
    misses_per_step: float  # reads a layer had to wait for from the start (not prefetched), per timed step
    reads_per_step: float  # all reads, prefetches included, per timed step

    @property
    def seconds_per_step(self) -> float:
        return sum(self.step_seconds) / len(self.step_seconds)


class _FutureUses:
    """Where each key is used next in the flat sequence of (step, layer) uses."""

    def __init__(self, steps: Sequence[Step]):
        self.flat: list[tuple[int, int, Hashable]] = [
            (step, layer, key) for step, layers in enumerate(steps) for layer, keys in enumerate(layers) for key in keys
        ]
        self._uses: dict[Hashable, list[int]] = {}
        for index, (_, _, key) in enumerate(self.flat):
            self._uses.setdefault(key, []).append(index)

    def next_use(self, key: Hashable, after: int) -> int:
        """Index of the key's first use at or after `after` (len(flat) when it is never used again)."""
        uses = self._uses.get(key, [])
        found = bisect.bisect_left(uses, after)
        return uses[found] if found < len(uses) else len(self.flat)


def replay(
    steps: Sequence[Step],
    timed: Sequence[bool],
    capacity_bytes: int,
    nbytes: Mapping[Hashable, int],
    costs: ReplayCosts,
    oracle_window: int | None = None,
) -> Replayed:
    """Time `steps` with on-demand reads and LRU eviction (oracle_window None) or with the oracle prefetching
    `oracle_window` layers ahead (0: Belady eviction on demand only). The cache starts empty; only the steps
    marked in `timed` count."""
    if len(timed) != len(steps):
        raise ValueError(f"{len(timed)} timed flags for {len(steps)} steps")
    if not any(timed):
        raise ValueError("no step is timed")
    largest = max(nbytes.values())
    if capacity_bytes < largest:
        raise ValueError(f"a cache of {capacity_bytes} bytes cannot hold one expert of {largest} bytes")
    future = _FutureUses(steps) if oracle_window is not None else None
    cache = _TimedCache(capacity_bytes, nbytes, costs.read_bytes_per_second, future)
    now, misses, reads = 0.0, 0, 0
    step_seconds = []
    position = 0  # index of the next use in the flat sequence
    for step, layers in enumerate(steps):
        started, reads_before, step_misses = now, cache.reads, 0
        for layer, keys in enumerate(layers):
            now += costs.layer_seconds
            layer_end = position + len(keys)
            for index, chunk in enumerate(chunks_that_fit(keys, nbytes.__getitem__, capacity_bytes)):  # as the pool runs them: chunks that fit
                protected = set(chunk)
                for offset, key in enumerate(chunk):  # demand reads first, then reads ahead
                    if cache.ready_time(key) is None:
                        cache.read(key, now, protected, position + offset)
                        step_misses += 1
                if index == 0 and future is not None and oracle_window:
                    cache.prefetch_window(layer_end, step, layer, oracle_window, len(layers), protected, now)
                for key in chunk:
                    cache.touch(key, position)
                    now = max(now, cache.ready_time(key)) + costs.expert_seconds
                    position += 1
        if timed[step]:
            step_seconds.append(now - started)
            reads += cache.reads - reads_before
            misses += step_misses
    count = len(step_seconds)
    return Replayed(tuple(step_seconds), misses / count, reads / count)


class _TimedCache:
    """Keys with the time their read completes, under a byte capacity, filled by one disk."""

    def __init__(self, capacity: int, nbytes: Mapping[Hashable, int], bytes_per_second: float, future: _FutureUses | None):
        self.capacity, self.nbytes, self.bytes_per_second, self.future = capacity, nbytes, bytes_per_second, future
        self.ready: dict[Hashable, float] = {}
        self.last_use: dict[Hashable, int] = {}
        self.used = 0
        self.disk_free = 0.0
        self.reads = 0

    def ready_time(self, key: Hashable) -> float | None:
        return self.ready.get(key)

    def touch(self, key: Hashable, position: int) -> None:
        self.last_use[key] = position

    def read(self, key: Hashable, now: float, protected: set, position: int) -> None:
        """Evict to make room (never a protected key), then queue the read."""
        while self.used + self.nbytes[key] > self.capacity:
            victim = self._victim(protected, position)
            if victim is None:
                raise AssertionError("a chunk that fits the capacity found no expert to evict")
            self._evict(victim)
        self._start(key, now)

    def prefetch_window(self, start: int, step: int, layer: int, window: int, num_layers: int, protected: set, now: float) -> None:
        """Queue the reads of the uses from `start` through the next `window` layers, evicting only keys needed later."""
        future = self.future
        horizon = step * num_layers + layer + window
        for index in range(start, len(future.flat)):
            use_step, use_layer, key = future.flat[index]
            if use_step * num_layers + use_layer > horizon:
                return
            if key in self.ready:
                continue
            need_at = index
            while self.used + self.nbytes[key] > self.capacity:
                victim = self._victim(protected, start)
                if victim is None or future.next_use(victim, start) <= need_at:
                    return  # the cache holds only keys needed sooner: stop here
                self._evict(victim)
            self._start(key, now)

    def _victim(self, protected: set, position: int) -> Hashable | None:
        candidates = [key for key in self.ready if key not in protected]
        if not candidates:
            return None
        if self.future is None:
            return min(candidates, key=lambda key: self.last_use.get(key, -1))
        return max(candidates, key=lambda key: self.future.next_use(key, position))

    def _evict(self, key: Hashable) -> None:
        del self.ready[key]
        self.used -= self.nbytes[key]

    def _start(self, key: Hashable, now: float) -> None:
        begin = max(now, self.disk_free)
        self.disk_free = begin + self.nbytes[key] / self.bytes_per_second
        self.ready[key] = self.disk_free
        self.used += self.nbytes[key]
        self.reads += 1
