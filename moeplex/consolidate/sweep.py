"""Budget sweep: own-domain perplexity increase of each sharing method, and of the merging baselines."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from moeplex.consolidate.analysis import FamilyAnalysis
from moeplex.consolidate.policies import PLAN_METHODS
from moeplex.consolidate.evaluator import Evaluator
from moeplex.eval.domains import heldout_token_ids
from moeplex.eval.perplexity import predictions_perplexity

SWEEP_MAX_MULTIPLE = 2.5
SWEEP_POINTS = 6


def sweep_budgets(analysis: FamilyAnalysis, points: int = SWEEP_POINTS) -> list[int]:
    """From the smallest store (every position shared) up to 2.5x one model (or no sharing, if less)."""
    sizes = analysis.sizes
    top = min(int(SWEEP_MAX_MULTIPLE * sizes.one_model), sizes.unshared)
    top = max(top, sizes.smallest)
    return [int(sizes.smallest + (top - sizes.smallest) * i / (points - 1)) for i in range(points)]


class OwnDomainScorer:
    """Own-domain held-out perplexity of each variant, with the originals' numbers cached."""

    def __init__(
        self,
        checkpoints: dict[str, Path],
        own_domain: dict[str, str],
        max_tokens: int,
        dtype: torch.dtype,
        evaluator: Evaluator,
    ):
        self.own_domain, self.dtype, self.evaluator = own_domain, dtype, evaluator
        tokenizer = AutoTokenizer.from_pretrained(next(iter(checkpoints.values())))
        self.ids = {d: heldout_token_ids(tokenizer, d, max_tokens) for d in set(own_domain.values())}
        self.original = {v: self.perplexity(evaluator.load(checkpoints[v], dtype), d) for v, d in own_domain.items()}

    def perplexity(self, model, domain: str) -> float:
        return predictions_perplexity(self.evaluator.predictions(model), self.ids[domain])

    def increase(self, variant: str, model) -> float:
        """Relative own-domain perplexity increase over the original variant."""
        return self.perplexity(model, self.own_domain[variant]) / self.original[variant] - 1.0

    def mean_increase(self, model_of_variant) -> float:
        values = [self.increase(v, model_of_variant(v)) for v in self.own_domain]
        return sum(values) / len(values)


def run_sweep(
    analysis: FamilyAnalysis,
    scorer: OwnDomainScorer,
    merged: dict[str, Path],
    budgets: list[int],
    progress: bool = True,
) -> dict:
    """The sweep's JSON: budgets, per-method mean own-domain ppl increase, baselines at their own size."""
    result = {
        "budgets": budgets,
        "budget_multiples": [b / analysis.sizes.one_model for b in budgets],
        "mean_ppl_increase": {m: [] for m in PLAN_METHODS},
        "stored_experts": {m: [] for m in PLAN_METHODS},
        "baselines_mean_ppl_increase": {},
        "original_own_domain_ppl": scorer.original,
    }
    bar = tqdm(total=len(budgets) * len(PLAN_METHODS) + len(merged), desc="sweep", disable=not progress)
    for budget in budgets:
        for method in PLAN_METHODS:
            plan = analysis.plan(method, budget)
            consolidated = scorer.evaluator.consolidated
            increase = scorer.mean_increase(lambda v: consolidated(plan, v, analysis.experts, scorer.dtype))
            result["mean_ppl_increase"][method].append(increase)
            result["stored_experts"][method].append(plan.num_stored_experts)
            bar.update()
    for name, folder in merged.items():
        model = scorer.evaluator.load(folder, scorer.dtype)
        result["baselines_mean_ppl_increase"][name] = scorer.mean_increase(lambda v: model)
        bar.update()
    bar.close()
    return result


def format_sweep(result: dict) -> str:
    lines = [f"{'budget':>10} {'x model':>8} " + " ".join(f"{m:>14}" for m in PLAN_METHODS)]
    for i, budget in enumerate(result["budgets"]):
        cells = " ".join(f"{result['mean_ppl_increase'][m][i]:>+13.1%} " for m in PLAN_METHODS)
        lines.append(f"{budget / 1e6:>8.1f}MB {result['budget_multiples'][i]:>7.2f}x {cells}")
    for name, value in result["baselines_mean_ppl_increase"].items():
        lines.append(f"baseline {name:<16} (one model's size): {value:+.1%}")
    return "\n".join(lines)
