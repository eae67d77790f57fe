"""The expert pool: experts in tiers (device, host, disk) under byte budgets, behind one door, `ensure_resident`.

Device tier: compute-ready weights (GPU memory on CUDA; on CPU, RAM under the same kind of byte
budget). Host tier: an optional LRU of evicted experts in RAM (pinned on CUDA). Disk tier: the
expert source, read past the page cache. Thread-safe: the compute thread asks for what it needs
now, a prefetch thread for what it will need; disk reads run outside the lock.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
import copy
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch

from moeplex.errors import ExpertReadError, MoeplexError
from moeplex.offload.policies import EvictionPolicy
from moeplex.offload.sources import ExpertSource, PoolExpert

T = TypeVar("T")


@dataclass
class PoolStats:
    hits: int = 0  # demanded and already on device
    misses: int = 0  # demanded and fetched on demand
    late_prefetches: int = 0  # demanded while its prefetch was in flight: waited for it
    evictions: int = 0
    wait_seconds: float = 0.0  # time the compute thread was blocked on fetches
    bytes_read: dict[str, int] = field(default_factory=lambda: {"disk": 0, "host": 0})
    prefetched_bytes: int = 0
    prefetch_used_bytes: int = 0  # prefetched, then demanded before eviction
    prefetch_wasted_bytes: int = 0  # prefetched, then evicted unused
    prefetch_errors: int = 0
    host_executions: int = 0  # experts run on the host tier's copy instead of being brought to the device
    host_executed_tokens: int = 0

    @property
    def demands(self) -> int:
        return self.hits + self.misses + self.late_prefetches

    @property
    def hit_rate(self) -> float:
        return self.hits / self.demands if self.demands else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        settled = self.prefetch_used_bytes + self.prefetch_wasted_bytes
        return self.prefetch_used_bytes / settled if settled else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"hit_rate": self.hit_rate, "prefetch_accuracy": self.prefetch_accuracy}


def chunks_that_fit(items: Sequence[T], nbytes: Callable[[T], int], capacity: int) -> list[list[T]]:
    """The items in order, split so that each chunk's bytes fit the capacity together (an item alone always forms a chunk)."""
    chunks: list[list[T]] = []
    current: list[T] = []
    used = 0
    for item in items:
        size = nbytes(item)
        if current and used + size > capacity:
            chunks.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    return chunks + [current]


class ExpertUnavailableError(ExpertReadError):
    """A demanded expert could not be fetched: `key` names it; dispatch adds `token_rows`, the tokens that needed it."""

    def __init__(self, key: Hashable, message: str):
        super().__init__(message)
        self.key = key
        self.token_rows: list[int] = []


class HostTier:
    """Experts evicted from the device, kept in RAM (pinned when CUDA is present) under a byte budget, LRU."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._experts: OrderedDict[Hashable, PoolExpert] = OrderedDict()

    def put(self, key: Hashable, weights: PoolExpert) -> None:
        if weights.nbytes > self.budget:
            return
        while self.used + weights.nbytes > self.budget:
            self.used -= self._experts.popitem(last=False)[1].nbytes
        host = weights.to("cpu")
        if torch.cuda.is_available():
            host = host.pin_memory()
        self._experts[key] = host
        self.used += host.nbytes

    def peek(self, key: Hashable) -> PoolExpert | None:
        """The host copy of key, left in the tier (None when it holds none)."""
        weights = self._experts.get(key)
        if weights is not None:
            self._experts.move_to_end(key)
        return weights

    def take(self, key: Hashable) -> PoolExpert | None:
        weights = self._experts.pop(key, None)
        if weights is not None:
            self.used -= weights.nbytes
        return weights


class ExpertPool:
    """Experts by key; at most `device_budget` bytes of them compute-ready on `device` (fetches in flight included)."""

    def __init__(
        self, source: ExpertSource, policy: EvictionPolicy, device_budget: int, host_budget: int = 0, device="cpu"
    ):
        self.source, self.policy, self.device_budget = source, policy, device_budget
        self.device = torch.device(device)
        self.host = HostTier(host_budget)
        self.stats = PoolStats()
        self._cond = threading.Condition()
        self._device: dict[Hashable, PoolExpert] = {}
        self._loading: set[Hashable] = set()
        self._reserved = 0  # bytes of device experts plus fetches in flight
        self._protected: frozenset = frozenset()
        self._unused_prefetches: set[Hashable] = set()

    def ensure_resident(self, keys: Iterable[Hashable]) -> list[PoolExpert]:
        """Compute-ready weights of each key, fetching what is missing; the keys stay protected until the next call."""
        keys = list(keys)
        needed = sum(self.source.expert_nbytes(key) for key in keys)
        if needed > self.device_budget:
            raise ValueError(f"{len(keys)} experts need {needed} bytes, over the device budget of {self.device_budget}")
        with self._cond:
            self._protected = frozenset(keys)
        return [self._demand(key) for key in keys]

    def prefetch(self, key: Hashable) -> bool:
        """Fetch key if the policy ranks it above what it would evict; False if not fetched (or the read failed)."""
        nbytes = self.source.expert_nbytes(key)
        with self._cond:
            if key in self._device or key in self._loading:
                return False
            from_host = self.host.take(key)
            if not self._make_room(nbytes, candidate=key):
                if from_host is not None:
                    self.host.put(key, from_host)
                return False
            self._start_loading(key, nbytes)
        try:
            weights = self._fetch(key, from_host)
        except MoeplexError:
            with self._cond:
                self.stats.prefetch_errors += 1
                self._abandon(key, nbytes)
            return False
        with self._cond:
            self._install(key, weights)
            self._unused_prefetches.add(key)
            self.stats.prefetched_bytes += nbytes
        return True

    def host_copy(self, key: Hashable, tokens: int) -> PoolExpert | None:
        """The host tier's copy of a key that is not on the device, counted as run there for `tokens` rows; else None."""
        with self._cond:
            if key in self._device or key in self._loading:
                return None
            weights = self.host.peek(key)
            if weights is not None:
                self.stats.host_executions += 1
                self.stats.host_executed_tokens += tokens
            return weights

    def set_device_budget(self, nbytes: int) -> None:
        """Grow or shrink the budget now; shrinking evicts (policy order) until the experts held fit.

        Fetches in flight keep their room until they land; later demands then evict down to the budget.
        Call it between forward passes: a shrink may evict experts the last layer used.
        """
        with self._cond:
            self.device_budget = nbytes
            while self._reserved > nbytes:
                victim = self.policy.choose_victim(list(self._device), frozenset())
                if victim is None:
                    break
                self._evict(victim)
            self._cond.notify_all()

    def resident_keys(self) -> set[Hashable]:
        with self._cond:
            return set(self._device)

    def snapshot(self) -> tuple[PoolStats, dict[str, int]]:
        """A copy of the counters and the bytes of experts held per tier (device, host), taken under the lock."""
        with self._cond:
            device = sum(weights.nbytes for weights in self._device.values())
            return copy.deepcopy(self.stats), {"device": device, "host": self.host.used}

    def _demand(self, key: Hashable) -> PoolExpert:
        nbytes = self.source.expert_nbytes(key)
        started, waited, from_host = time.perf_counter(), False, None
        with self._cond:
            while True:
                weights = self._device.get(key)
                if weights is not None:
                    self._count_use(key, nbytes, waited, started)
                    return weights
                if key not in self._loading:
                    from_host = from_host or self.host.take(key)  # before making room pushes it out
                    if self._make_room(nbytes):
                        break
                waited = True  # for this key's prefetch, or for fetches in flight to free room
                self._cond.wait()
            self._start_loading(key, nbytes)
            self.stats.misses += 1
        try:
            weights = self._fetch(key, from_host)
        except BaseException as exc:
            with self._cond:
                self._abandon(key, nbytes)
            if isinstance(exc, MoeplexError) and not isinstance(exc, ExpertUnavailableError):
                raise ExpertUnavailableError(key, str(exc)) from exc
            raise
        with self._cond:
            self._install(key, weights)
            self.policy.record_access(key)
            self.stats.wait_seconds += time.perf_counter() - started
        return weights

    def _count_use(self, key: Hashable, nbytes: int, waited: bool, started: float) -> None:
        if waited:
            self.stats.late_prefetches += 1
            self.stats.wait_seconds += time.perf_counter() - started
        else:
            self.stats.hits += 1
        if key in self._unused_prefetches:
            self._unused_prefetches.discard(key)
            self.stats.prefetch_used_bytes += nbytes
        self.policy.record_access(key)

    def _make_room(self, nbytes: int, candidate: Hashable | None = None) -> bool:
        """Evict until nbytes fit (lock held); never a protected key, and for a prefetch only keys ranked below it."""
        while self.device_budget - self._reserved < nbytes:
            victim = self.policy.choose_victim(list(self._device), self._protected)
            if victim is None or (candidate is not None and self.policy.priority(victim) >= self.policy.priority(candidate)):
                return False
            self._evict(victim)
        return True

    def _evict(self, key: Hashable) -> None:
        weights = self._device.pop(key)
        self._reserved -= weights.nbytes
        self.policy.forget(key)
        self.stats.evictions += 1
        if key in self._unused_prefetches:
            self._unused_prefetches.discard(key)
            self.stats.prefetch_wasted_bytes += weights.nbytes
        self.host.put(key, weights)

    def _start_loading(self, key: Hashable, nbytes: int) -> None:
        self._loading.add(key)
        self._reserved += nbytes

    def _abandon(self, key: Hashable, nbytes: int) -> None:
        self._loading.discard(key)
        self._reserved -= nbytes
        self._cond.notify_all()

    def _install(self, key: Hashable, weights: PoolExpert) -> None:
        self._loading.discard(key)
        self._device[key] = weights
        self._cond.notify_all()

    def _fetch(self, key: Hashable, from_host: PoolExpert | None) -> PoolExpert:
        """Weights on the device, from the host tier's copy when there is one, else from disk (no lock held)."""
        if from_host is not None:
            weights, tier, nbytes = from_host, "host", from_host.nbytes
        else:
            weights, nbytes = self.source.read(key)
            tier = "disk"
        with self._cond:
            self.stats.bytes_read[tier] += nbytes
        return weights.to(self.device)
