"""Measurement helpers shared by benchmarks: alternating timed runs, medians and percentiles, streaming bandwidth."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of fn(), including the GPU work it queued."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per run for each system, run A B A B ... after warm-up so noise hits all alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(timed(fn))
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def streaming_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 7, device="cpu") -> float:
    """Bytes/s of a GEMV streaming an fp32 weight far larger than the caches (the decode roofline)."""
    rows = nbytes // 4 // 4096
    weight = torch.randn(rows, 4096, device=device)
    x = torch.randn(1, 4096, device=device)
    F.linear(x, weight)
    seconds = median([timed(lambda: F.linear(x, weight)) for _ in range(repeats)])
    return weight.numel() * weight.element_size() / seconds
