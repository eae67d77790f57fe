"""Which expert positions get lower precision: pure selection policies (no model needed).

Every policy answers `choose(positions, counts)` with a precision for each position, where counts says
how many positions go to each quantized precision, e.g. {"int4": 20, "int8": 12}; the rest stay bf16.
A policy is a cost per (position, precision); the cheapest positions are quantized, int4 handed out first.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping

from moeplex.quant.formats import QUANTIZED, UNQUANTIZED, Position

# What least-error-first's measured error is: the KL at the model's output with the expert alone quantized
# (moeplex.planner.model_error), or the quantized expert's own relative output error (moeplex.quant.output_error)
SELECTION_ERRORS = ("model", "expert")
DEFAULT_SELECTION_ERROR = "model"


def check_counts(counts: Mapping[str, int], available: int) -> None:
    unknown = sorted(set(counts) - set(QUANTIZED))
    if unknown:
        raise ValueError(f"counts may only name {', '.join(QUANTIZED)}; got {', '.join(unknown)}")
    for precision, count in counts.items():
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count of {precision} positions must be a non-negative integer, not {count!r}")
    if sum(counts.values()) > available:
        raise ValueError(f"asked to quantize {sum(counts.values())} positions, but there are only {available}")


def assign_cheapest(
    positions: Iterable[Position], counts: Mapping[str, int], cost: Callable[[Position, str], float]
) -> dict[Position, str]:
    """For int4 then int8: the counts[p] unassigned positions of lowest cost(position, p) get p (ties: by position)."""
    remaining = sorted(set(positions))
    check_counts(counts, len(remaining))
    chosen = {position: UNQUANTIZED for position in remaining}
    for precision in QUANTIZED:
        ranked = sorted(remaining, key=lambda position: cost(position, precision))  # stable: ties by position
        for position in ranked[: counts.get(precision, 0)]:
            chosen[position] = precision
        remaining = ranked[counts.get(precision, 0) :]
    return chosen


class RandomSelection:
    """The published baseline: a seeded shuffle, the same for the same seed and positions."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def choose(self, positions: Iterable[Position], counts: Mapping[str, int]) -> dict[Position, str]:
        ordered = sorted(set(positions))
        random.Random(self.seed).shuffle(ordered)
        rank = {position: i for i, position in enumerate(ordered)}
        return assign_cheapest(ordered, counts, lambda position, _: rank[position])


class LeastRoutedFirst:
    """The least often routed positions are quantized first; frequency per (layer, expert), from traces."""

    name = "least-routed-first"

    def __init__(self, frequency: Mapping[Position, float]):
        self.frequency = frequency

    def choose(self, positions: Iterable[Position], counts: Mapping[str, int]) -> dict[Position, str]:
        positions = list(positions)
        _require(self.frequency, positions, "routing frequency")
        return assign_cheapest(positions, counts, lambda position, _: self.frequency[position])


class LeastErrorFirst:
    """Quantize where (measured output error at that precision) x (routing frequency) is lowest."""

    name = "least-error-first"

    def __init__(self, errors: Mapping[Position, Mapping[str, float]], frequency: Mapping[Position, float]):
        self.errors, self.frequency = errors, frequency

    def choose(self, positions: Iterable[Position], counts: Mapping[str, int]) -> dict[Position, str]:
        positions = list(positions)
        check_counts(counts, len(set(positions)))
        _require(self.frequency, positions, "routing frequency")
        _require(self.errors, positions, "measured error")
        missing = sorted(p for p in counts if counts[p] and any(p not in self.errors[pos] for pos in positions))
        if missing:
            raise ValueError(f"no measured {', '.join(missing)} error for some positions")
        return assign_cheapest(positions, counts, lambda position, p: self.errors[position][p] * self.frequency[position])


def _require(table: Mapping[Position, object], positions: list[Position], what: str) -> None:
    missing = [position for position in positions if position not in table]
    if missing:
        raise ValueError(f"no {what} for positions {missing[:5]}")

