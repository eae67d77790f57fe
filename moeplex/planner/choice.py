"""Choose the configuration that meets a user's speed and quality constraints, or say which one cannot be met (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeplex.errors import MoeplexError
from moeplex.planner.pareto import Measurement, pareto_frontier

MIN_TOKENS = "min-tokens-per-second"
MAX_PPL_INCREASE = "max-ppl-increase"


@dataclass(frozen=True)
class Constraints:
    """min_tokens_per_s: decode tokens/s floor; max_ppl_increase: ppl ceiling as a fraction over the reference (0.05 = +5%)."""

    min_tokens_per_s: float | None = None
    max_ppl_increase: float | None = None

    def max_ppl(self, reference_ppl: float) -> float | None:
        return None if self.max_ppl_increase is None else reference_ppl * (1 + self.max_ppl_increase)

    def failing(self, point: Measurement, reference_ppl: float) -> list[str]:
        """The names of the constraints this point does not meet."""
        failed = []
        if self.min_tokens_per_s is not None and point.tokens_per_s < self.min_tokens_per_s:
            failed.append(MIN_TOKENS)
        max_ppl = self.max_ppl(reference_ppl)
        if max_ppl is not None and point.ppl > max_ppl:
            failed.append(MAX_PPL_INCREASE)
        return failed


class ConstraintError(MoeplexError):
    """No measured configuration meets the constraints; names the failing ones and the closest point."""

    def __init__(self, message: str, failing: list[str], closest: Measurement):
        super().__init__(message)
        self.failing, self.closest = failing, closest


def choose_configuration(points: Sequence[Measurement], constraints: Constraints, reference_ppl: float) -> Measurement:
    """The frontier point meeting every constraint: the fastest if only perplexity is bounded, else the best perplexity.

    reference_ppl: the all-bf16 configuration's perplexity, which max_ppl_increase is relative to.
    Raises ConstraintError (with the closest point) when no point meets them all, or ValueError when there are no points.
    """
    frontier = pareto_frontier(points)
    if not frontier:
        raise ValueError("no measured configuration to choose from")
    feasible = [p for p in frontier if not constraints.failing(p, reference_ppl)]
    if feasible:
        only_quality_bounded = constraints.min_tokens_per_s is None and constraints.max_ppl_increase is not None
        return feasible[-1] if only_quality_bounded else feasible[0]  # frontier: slowest and best first
    closest = min(frontier, key=lambda p: _shortfall(p, constraints, reference_ppl))
    failing = constraints.failing(closest, reference_ppl)
    raise ConstraintError(_explain(frontier, constraints, reference_ppl, closest, failing), failing, closest)


def _shortfall(point: Measurement, constraints: Constraints, reference_ppl: float) -> float:
    """Sum of the relative amounts by which the point misses each constraint."""
    missed = 0.0
    if constraints.min_tokens_per_s is not None:
        missed += max(0.0, 1 - point.tokens_per_s / constraints.min_tokens_per_s)
    max_ppl = constraints.max_ppl(reference_ppl)
    if max_ppl is not None:
        missed += max(0.0, point.ppl / max_ppl - 1)
    return missed


def describe(point: Measurement, reference_ppl: float) -> str:
    increase = point.ppl / reference_ppl - 1
    return f"{point.config.key}: {point.tokens_per_s:.1f} tokens/s, ppl {point.ppl:.3f} ({increase:+.1%})"


def _explain(frontier, constraints, reference_ppl, closest, failing) -> str:
    fastest, best = frontier[-1], frontier[0]
    reasons = []
    if MIN_TOKENS in failing and fastest.tokens_per_s < constraints.min_tokens_per_s:
        reasons.append(f"--{MIN_TOKENS} {constraints.min_tokens_per_s:g} cannot be met: the fastest configuration that fits "
                       f"makes {fastest.tokens_per_s:.1f} tokens/s")
    if MAX_PPL_INCREASE in failing and best.ppl > constraints.max_ppl(reference_ppl):
        reasons.append(f"--{MAX_PPL_INCREASE} {constraints.max_ppl_increase:g} cannot be met: the best configuration that fits "
                       f"has ppl {best.ppl:.3f} ({best.ppl / reference_ppl - 1:+.1%} over {reference_ppl:.3f})")
    if not reasons:
        reasons.append(f"--{MIN_TOKENS} and --{MAX_PPL_INCREASE} cannot be met together (each can alone)")
    return "; ".join(reasons) + f"; closest point: {describe(closest, reference_ppl)}"
