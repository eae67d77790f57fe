"""Aggregates request samples: latency statistics, throughput, errors, queue time from server histograms, saturation, the headline ratios."""

from __future__ import annotations

import math

from moeplex.bench.measure import percentile
from moeplex.bench.multitenant.client import Sample

STATISTICS = ("mean", "p50", "p90", "p99")


def describe(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values) if values else math.nan, "p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99)}


def summarize(samples: list[Sample]) -> dict:
    """Turnaround (arrival to last token), TTFT, time per output token, throughput and errors of one run."""
    ok = [s for s in samples if s.error is None and s.done is not None]
    first_arrival = min((s.arrival for s in samples), default=0.0)
    makespan = max((s.done for s in ok), default=first_arrival)
    by_arrival = sorted(ok, key=lambda s: s.arrival)
    third = len(by_arrival) // 3
    first, last = ([s.done - s.arrival for s in part] for part in (by_arrival[:third], by_arrival[len(by_arrival) - third :]))
    span = makespan - first_arrival
    tokens = sum(s.output_tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "turnaround": describe([s.done - s.arrival for s in ok]),
        "ttft": describe([s.first_token - s.arrival for s in ok if s.first_token is not None]),
        "tpot": describe([(s.done - s.first_token) / (s.output_tokens - 1) for s in ok if s.first_token is not None and s.output_tokens > 1]),
        "output_tokens": tokens,
        "seconds": span,
        "makespan": makespan,
        "turnaround_growth": sum(last) / sum(first) if third and sum(first) > 0 else math.nan,  # last third of arrivals over the first
        "requests_per_second": len(ok) / span if span > 0 else math.nan,
        "tokens_per_second": tokens / span if span > 0 else math.nan,
    }


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets, q in 0..1."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


def queue_time(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Queue-time statistics of the requests between two scrapes of `moeplex_request_queue_time_seconds` (summed over variants)."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    count = delta.get("count", 0.0)
    buckets = sorted((float(key[3:]), value) for key, value in delta.items() if key.startswith("le="))
    return {
        "mean": delta.get("sum", 0.0) / count if count else math.nan,
        "p50": histogram_quantile(buckets, 0.5), "p90": histogram_quantile(buckets, 0.9), "p99": histogram_quantile(buckets, 0.99),
    }


def parse_queue_histogram(text: str) -> dict[str, float]:
    """Sum, count and cumulative buckets (keys 'le=BOUND') of the queue-time histogram in Prometheus text, over all variants."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("moeplex_request_queue_time_seconds"):
            continue
        name_and_labels, value = line.rsplit(" ", 1)
        if name_and_labels.startswith("moeplex_request_queue_time_seconds_bucket"):
            bound = name_and_labels.split('le="', 1)[1].split('"', 1)[0]
            key = f"le={float(bound)}"
        elif name_and_labels.startswith("moeplex_request_queue_time_seconds_sum"):
            key = "sum"
        elif name_and_labels.startswith("moeplex_request_queue_time_seconds_count"):
            key = "count"
        else:
            continue
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def gauge_total(text: str, name: str) -> float:
    """The sum of a gauge's samples (over labels) in Prometheus text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{"))


def is_saturated(run: dict, duration: float, served_fraction: float = 0.9, growth: float = 2.0) -> bool:
    """Saturated (an open-loop run of `duration` s of arrivals): a request failed, serving took clearly longer than arriving
    (served per second < served_fraction x arrived per second), or the queue built up (the last third of arrivals waited
    `growth` x as long as the first third). Latency that rises with load but stays level over the run is not saturation."""
    return run["errors"] > 0 or run["makespan"] * served_fraction > duration or run["turnaround_growth"] > growth


def turnaround_reduction(moeplex_mean: float, static_mean: float) -> float:
    """The headline: 1 - moeplex / static of mean turnaround."""
    return 1.0 - moeplex_mean / static_mean
