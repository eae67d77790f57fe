"""A background thread that fetches predicted experts, most likely and nearest first, dropping stale work.

Each `submit` replaces the queue: work from older predictions that the new ones do not repeat is
dropped (counted as stale). The pool itself guarantees that a prefetch never evicts a protected
expert (the current layer's) or one the policy ranks above the expert being fetched.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Self

from moeplex.cores import one_omp_thread_for_this_thread
from moeplex.offload.pool import ExpertPool


@dataclass(frozen=True)
class PrefetchRequest:
    key: Hashable
    probability: float  # that the batch will need it
    distance: int  # layer steps until it is needed

    def order(self) -> tuple[float, int]:
        return (-self.probability, self.distance)


@dataclass
class PrefetcherStats:
    submitted: int = 0
    dropped_stale: int = 0
    fetched: int = 0  # prefetches that read an expert
    declined: int = 0  # already resident or in flight, or the policy would not make room


class Prefetcher:
    """Owns one worker thread; use as a context manager, or call close()."""

    def __init__(self, pool: ExpertPool):
        self.pool = pool
        self.stats = PrefetcherStats()
        self._cond = threading.Condition()
        self._queue: list[tuple[tuple[float, int], int, PrefetchRequest]] = []
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moeplex-prefetch", daemon=True)
        self._thread.start()

    def submit(self, requests: list[PrefetchRequest]) -> None:
        """Replace the queued work with these requests."""
        with self._cond:
            if not requests and not self._queue:
                return  # nothing to drop or add: leave the worker asleep
            wanted = {request.key for request in requests}
            self.stats.dropped_stale += sum(1 for *_, queued in self._queue if queued.key not in wanted)
            self.stats.submitted += len(requests)
            self._queue = [(request.order(), index, request) for index, request in enumerate(requests)]
            heapq.heapify(self._queue)
            self._cond.notify_all()

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """True once the queue is empty and no fetch is running (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        one_omp_thread_for_this_thread()  # fetches must not slow the compute threads' parallel ops
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed:
                    return
                request = heapq.heappop(self._queue)[2]
                self._busy = True
            fetched = self.pool.prefetch(request.key)
            with self._cond:
                if fetched:
                    self.stats.fetched += 1
                else:
                    self.stats.declined += 1
