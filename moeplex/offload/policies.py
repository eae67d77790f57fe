"""Cache eviction policies: pure objects that rank resident experts and pick the one to drop.

A policy sees accesses and (for the trace-aware one) reuse estimates; it never sees weights. The pool
asks `choose_victim(candidates, protected)` and never gets a protected key back (what the current
layer needs). Lower `priority` means evicted first.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping

ExpertKey = Hashable


class EvictionPolicy:
    """Shared bookkeeping: a logical clock of accesses; subclasses define `priority`."""

    name = "policy"

    def __init__(self):
        self._clock = 0
        self._last_access: dict[ExpertKey, int] = {}

    def record_access(self, key: ExpertKey) -> None:
        self._clock += 1
        self._last_access[key] = self._clock

    def forget(self, key: ExpertKey) -> None:
        """The key left the tier; recency is dropped (frequency-based policies may keep counts)."""
        self._last_access.pop(key, None)

    def priority(self, key: ExpertKey) -> tuple:
        raise NotImplementedError

    def choose_victim(self, candidates: Iterable[ExpertKey], protected: frozenset | set = frozenset()) -> ExpertKey | None:
        """The candidate to evict first, or None when every candidate is protected."""
        eligible = [key for key in candidates if key not in protected]
        return min(eligible, key=self.priority) if eligible else None

    def recency(self, key: ExpertKey) -> int:
        return self._last_access.get(key, 0)


class LRUPolicy(EvictionPolicy):
    """Evicts the least recently used expert."""

    name = "lru"

    def priority(self, key):
        return (self.recency(key),)


class LFUPolicy(EvictionPolicy):
    """Evicts the least frequently used expert (counts survive eviction); ties go to the least recent."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self._count: dict[ExpertKey, int] = {}

    def record_access(self, key):
        super().record_access(key)
        self._count[key] = self._count.get(key, 0) + 1

    def priority(self, key):
        return (self._count.get(key, 0), self.recency(key))


class TraceAwarePolicy(EvictionPolicy):
    """Evicts the expert with the lowest predicted reuse rate times the cost of fetching it again.

    Reuse rates (expected uses per layer step, see `moeplex.offload.reuse`) come from the running
    batch's predictions and the trace library. `set_reuse` takes them, or a function that computes them,
    which then runs at the first ranking asked for after it: most layers evict nothing, so computing
    every key's rate at every layer would mostly be wasted host time on the compute thread. The
    estimates are swapped in one assignment, so a prefetch thread ranking concurrently sees either the
    old or the new ones (at worst a function runs twice). Keys without an estimate rank lowest; ties go
    to the least recently used.
    """

    name = "trace"

    def __init__(self, transfer_cost: Callable[[ExpertKey], float] = lambda key: 1.0):
        super().__init__()
        self.transfer_cost = transfer_cost
        self._reuse: tuple[Callable[[], Mapping[ExpertKey, float]], Mapping[ExpertKey, float] | None] = (dict, None)

    def set_reuse(self, reuse_rates: Mapping[ExpertKey, float] | Callable[[], Mapping[ExpertKey, float]]) -> None:
        if callable(reuse_rates):
            self._reuse = (reuse_rates, None)
        else:
            self._reuse = (lambda: reuse_rates, reuse_rates)

    def reuse_rates(self) -> Mapping[ExpertKey, float]:
        current = self._reuse
        compute, rates = current
        if rates is None:
            rates = compute()
            if self._reuse is current:
                self._reuse = (compute, rates)
        return rates

    def priority(self, key):
        return (self.reuse_rates().get(key, 0.0) * self.transfer_cost(key), self.recency(key))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy, "trace": TraceAwarePolicy}


def make_policy(name: str, transfer_cost: Callable[[ExpertKey], float] | None = None) -> EvictionPolicy:
    """A policy by name; transfer_cost (e.g. bytes to fetch a key again) weights the trace-aware one."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy '{name}' (choose from {', '.join(POLICIES)})")
    if name == "trace" and transfer_cost is not None:
        return TraceAwarePolicy(transfer_cost)
    return POLICIES[name]()
