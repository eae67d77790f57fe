"""The throughput-quality Pareto frontier of measured configurations (pure)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from moeplex.planner.configurations import Configuration


@dataclass(frozen=True)
class Measurement:
    """One configuration as measured: decode tokens/s (higher is better), perplexity (lower is better), bytes."""

    config: Configuration
    tokens_per_s: float
    ppl: float
    resident_bytes: int  # device bytes: backbones and the resident experts
    resident_fraction: float = 1.0  # of the configuration's expert bytes, resident (below 1: timed offloaded)

    def to_json(self) -> dict:
        return {
            "tokens_per_s": self.tokens_per_s,
            "ppl": self.ppl,
            "resident_bytes": self.resident_bytes,
            "resident_fraction": self.resident_fraction,
            "config": self.config.to_json(),
        }


def dominates(a: Measurement, b: Measurement) -> bool:
    """a is at least as fast and as good as b, and strictly better in one of the two."""
    return a.tokens_per_s >= b.tokens_per_s and a.ppl <= b.ppl and (a.tokens_per_s > b.tokens_per_s or a.ppl < b.ppl)


def pareto_frontier(points: Iterable[Measurement]) -> list[Measurement]:
    """The points that no other point dominates, slowest (and best perplexity) first.

    Of points with exactly equal tokens/s and perplexity only the first given is kept.
    """
    fastest_first = sorted(points, key=lambda p: (-p.tokens_per_s, p.ppl))  # stable: equal points keep their order
    frontier, best_ppl = [], math.inf
    for point in fastest_first:
        if point.ppl < best_ppl:  # strictly better than everything at least as fast
            frontier.append(point)
            best_ppl = point.ppl
    return frontier[::-1]
