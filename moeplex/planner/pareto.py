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
    kl: float | None = None  # KL divergence from the all-bf16 model per token (lower is better)

    def to_json(self) -> dict:
        return {
            "tokens_per_s": self.tokens_per_s,
            "ppl": self.ppl,
            "resident_bytes": self.resident_bytes,
            "resident_fraction": self.resident_fraction,
            "kl": self.kl,
            "config": self.config.to_json(),
        }

    @staticmethod
    def from_json(data: dict) -> Measurement:
        return Measurement(Configuration.from_json(data["config"]), data["tokens_per_s"], data["ppl"], data["resident_bytes"],
                           data["resident_fraction"], data["kl"])


QUALITIES = ("ppl", "kl")  # lower is better for both


def dominates(a: Measurement, b: Measurement, quality: str = "ppl") -> bool:
    """a is at least as fast and as good as b (by `quality`), and strictly better in one of the two."""
    qa, qb = getattr(a, quality), getattr(b, quality)
    return a.tokens_per_s >= b.tokens_per_s and qa <= qb and (a.tokens_per_s > b.tokens_per_s or qa < qb)


def pareto_frontier(points: Iterable[Measurement], quality: str = "ppl") -> list[Measurement]:
    """The points that no other point dominates in tokens/s and `quality` (ppl or kl), slowest (and best quality) first.

    Of points with exactly equal tokens/s and quality only the first given is kept.
    """
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {', '.join(QUALITIES)}, not '{quality}'")
    fastest_first = sorted(points, key=lambda p: (-p.tokens_per_s, getattr(p, quality)))  # stable: equal points keep their order
    frontier, best = [], math.inf
    for point in fastest_first:
        if getattr(point, quality) < best:  # strictly better than everything at least as fast
            frontier.append(point)
            best = getattr(point, quality)
    return frontier[::-1]
