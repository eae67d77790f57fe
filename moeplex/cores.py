"""How many CPU cores this process may use, how many torch threads an engine behind the HTTP server gets, and
background threads kept off the compute threads' cores."""

from __future__ import annotations

import ctypes
import os


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def serving_threads() -> int:
    """Torch threads for an engine behind the HTTP server: one per available core less one, at least 1.

    The free core runs the server's event loop (parsing, tokenizing, streaming every token as an event).
    When torch's threads take every core instead, each parallel op waits on the thread that the event loop
    pushed off its core, and every engine step gets slower; `moeplex bench serve --threads N` against its
    default measures the difference (docs/benchmarks.md).
    """
    return max(1, available_cores() - 1)


def one_omp_thread_for_this_thread() -> None:
    """Run torch's (and moeplex's kernels') parallel ops on the calling thread with one OpenMP thread; other threads keep theirs.

    For background threads that read and pack weights (the expert prefetcher, the backbone loader): left
    at torch's thread count, each such thread gets its own OpenMP team, and on a small CPU those teams
    wake on the cores the compute threads run on. On the 2-core Xeon VM an idle prefetcher whose thread had
    once packed experts with two OpenMP threads made every later parallel op of the decode thread slower:
    bench-size decoding with offloaded int4 experts took 1.5x as long (docs/offloading.md). torch's own
    `set_num_threads` would change every thread's count, so this sets OpenMP's per-thread value directly
    (after torch's lazy per-thread setup, which would otherwise overwrite it). A no-op where torch has no OpenMP.
    """
    import torch  # here, so the CLI's option parsing (which asks serving_threads) stays light

    torch.get_num_threads()  # torch sets each thread's OpenMP thread count on its first parallel query
    set_threads = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
    if set_threads is not None:
        set_threads(1)
