"""`moeplex consolidate` and `moeplex consolidate sweep`: analyse, plan, write the store, report."""

from __future__ import annotations

from pathlib import Path

import torch

from moeplex.consolidate.analysis import analyse_family, parse_budget
from moeplex.consolidate.family_spec import FamilySpec, load_family_spec
from moeplex.consolidate.merge import MERGE_METHODS, METHODS_NEEDING_BASE, merge_checkpoints
from moeplex.consolidate.policies import PLAN_METHODS
from moeplex.consolidate.report import variant_tables, write_report
from moeplex.consolidate.sweep import OwnDomainScorer, run_sweep, sweep_budgets
from moeplex.store.writer import write_store

EVAL_DTYPE = torch.float32


def resolve_family(family_yaml: Path | None) -> tuple[Path, FamilySpec]:
    """The family YAML given, or the tiny demo family's (built if missing)."""
    if family_yaml is None:
        from moeplex.demo import build_demo_family

        family_yaml = build_demo_family().spec_file
    return family_yaml, load_family_spec(family_yaml)


def merged_baselines(family: FamilySpec, folder: Path, progress: bool = True) -> dict[str, Path]:
    """One merged checkpoint per merging method (reused when already there)."""
    merged = {}
    for method in MERGE_METHODS:
        out = folder / method
        if not (out / "config.json").is_file():
            base = family.base if method in METHODS_NEEDING_BASE else None
            merge_checkpoints(method, list(family.variants.values()), out, base=base, progress=progress)
        merged[method] = out
    return merged


def run_consolidate(
    family_yaml: Path | None,
    budget: str,
    out: Path,
    method: str = "quality-aware",
    report_dir: Path | None = None,
    max_tokens: int = 2048,
    overwrite: bool = False,
    command_line: str = "",
) -> dict:
    """Plan under the budget, write the store; with report_dir, also evaluate and write the report."""
    family_yaml, family = resolve_family(family_yaml)
    analysis = analyse_family(family)
    budget_bytes = parse_budget(budget, analysis.sizes.one_model)
    plan = analysis.plan(method, budget_bytes)
    write_store(family, plan, out, overwrite=overwrite)
    store_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary = {"store": str(out), "method": method, "budget_bytes": budget_bytes,
               "stored_experts": plan.num_stored_experts, "store_bytes": store_bytes}
    if report_dir is None:
        return summary
    plans = {m: (plan if m == method else analysis.plan(m, budget_bytes)) for m in PLAN_METHODS}
    merged = merged_baselines(family, report_dir / "merged")
    tables = variant_tables(analysis, family.checkpoints(), family.own_domain, plans, merged, max_tokens, EVAL_DTYPE)
    scorer = OwnDomainScorer(family.checkpoints(), family.own_domain, max_tokens, EVAL_DTYPE, analysis.evaluator)
    sweep = run_sweep(analysis, scorer, merged, sweep_budgets(analysis))
    summary["report"] = str(
        write_report(report_dir, analysis, family.own_domain, budget_bytes, plans, tables, sweep, store_bytes, command_line)
    )
    return summary


def run_budget_sweep(family_yaml: Path | None, work_dir: Path, max_tokens: int = 2048) -> dict:
    """The budget sweep of every sharing method and merging baseline over the family."""
    family_yaml, family = resolve_family(family_yaml)
    analysis = analyse_family(family)
    merged = merged_baselines(family, work_dir / "merged")
    scorer = OwnDomainScorer(family.checkpoints(), family.own_domain, max_tokens, EVAL_DTYPE, analysis.evaluator)
    return run_sweep(analysis, scorer, merged, sweep_budgets(analysis))
