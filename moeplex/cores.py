"""How many CPU cores this process may use, and how many torch threads an engine behind the HTTP server gets."""

from __future__ import annotations

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
