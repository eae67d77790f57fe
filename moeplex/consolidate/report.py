"""The consolidation quality report: per-variant tables, store bytes, sweep, plots, one Markdown file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moeplex.consolidate.analysis import FamilyAnalysis
from moeplex.consolidate.plan import ConsolidationPlan
from moeplex.consolidate.plots import quality_vs_budget, similarity_heatmaps
from moeplex.consolidate.quality import agreement
from moeplex.consolidate.sweep import format_sweep
from moeplex.demo.corpora import DOMAINS
from moeplex.eval.domains import heldout_token_ids
from moeplex.eval.perplexity import predictions_perplexity


def variant_tables(
    analysis: FamilyAnalysis,
    checkpoints: dict[str, Path],
    own_domain: dict[str, str],
    plans: dict[str, ConsolidationPlan],
    merged: dict[str, Path],
    max_tokens: int,
    dtype: torch.dtype,
) -> dict:
    """variant -> system -> {"ppl": {domain: x}, "kl": x, "greedy_agreement": x} on held-out text."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[analysis.variants[0]])
    ids = {d: heldout_token_ids(tokenizer, d, max_tokens) for d in DOMAINS}
    evaluator = analysis.evaluator
    merged_models = {name: evaluator.load(folder, dtype) for name, folder in merged.items()}
    tables = {}
    for variant in analysis.variants:
        systems = {"original": evaluator.load(checkpoints[variant], dtype)}
        systems.update({m: evaluator.consolidated(p, variant, analysis.experts, dtype) for m, p in plans.items()})
        systems.update(merged_models)
        own_ids = ids[own_domain.get(variant, DOMAINS[0])]
        original = evaluator.predictions(systems["original"])
        rows = {}
        for name, model in systems.items():
            predict = evaluator.predictions(model)
            match = agreement(original, predict, own_ids)
            rows[name] = {
                "ppl": {d: predictions_perplexity(predict, ids[d]) for d in DOMAINS},
                "kl": match.kl,
                "greedy_agreement": match.greedy_agreement,
            }
        tables[variant] = rows
    return tables


def write_report(
    out_dir: Path,
    analysis: FamilyAnalysis,
    own_domain: dict[str, str],
    budget: int,
    plans: dict[str, ConsolidationPlan],
    tables: dict,
    sweep: dict,
    store_bytes: int | None,
    command: str,
) -> Path:
    """report.md (+ report.json and PNGs) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heatmaps = similarity_heatmaps(analysis, out_dir)
    budget_plot = quality_vs_budget(sweep, out_dir / "quality_vs_budget.png")
    sizes = analysis.sizes
    lines = [
        "# Consolidation report",
        "",
        f"Command: `{command}`",
        "",
        "## Bytes",
        "",
        f"- one model: {sizes.one_model / 1e6:.1f} MB; sum of the {sizes.num_variants} variants: "
        f"{sizes.num_variants * sizes.one_model / 1e6:.1f} MB",
        f"- budget: {budget / 1e6:.1f} MB ({budget / sizes.one_model:.2f}x one model)",
    ]
    for method, plan in plans.items():
        lines.append(
            f"- {method}: {plan.num_stored_experts} stored experts of {sizes.positions_per_variant * sizes.num_variants}"
            f" positions -> {sizes.stored_bytes(plan.num_stored_experts) / 1e6:.1f} MB"
        )
    if store_bytes is not None:
        lines.append(f"- store written: {store_bytes / 1e6:.1f} MB on disk (byte-identical experts stored once)")
    lines += ["", "## Quality per variant (held-out text)", "", f"Task: {analysis.evaluator.task}.", ""]
    for variant, rows in tables.items():
        own = own_domain.get(variant, "")
        lines += [f"### {variant} (own domain: {own})", ""]
        lines.append("| system | " + " | ".join(f"ppl {d}" for d in DOMAINS) + " | KL to original | greedy agreement |")
        lines.append("|---" * (len(DOMAINS) + 3) + "|")
        for system, row in rows.items():
            cells = " | ".join(f"**{row['ppl'][d]:.2f}**" if d == own else f"{row['ppl'][d]:.2f}" for d in DOMAINS)
            lines.append(f"| {system} | {cells} | {row['kl']:.4f} | {row['greedy_agreement']:.1%} |")
        lines.append("")
    lines += ["## Budget sweep (mean own-domain perplexity increase)", "", "```", format_sweep(sweep), "```", ""]
    lines += [f"![quality against budget]({budget_plot.name})", "", "## Expert similarity", ""]
    lines += [f"![{p.stem}]({p.name})" for p in heatmaps]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "report.json").write_text(json.dumps({"tables": tables, "sweep": sweep}, indent=2) + "\n")
    return report
