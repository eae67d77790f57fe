"""Analyse a family for consolidation: sizes, calibration inputs, weight distances and output errors."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from moeplex.consolidate.evaluator import Evaluator, evaluator_for
from moeplex.consolidate.family_spec import BASE, FamilySpec, open_family
from moeplex.consolidate.plan import ConsolidationPlan
from moeplex.consolidate.policies import PlanShape, l2_roundrobin_plan, quality_aware_plan
from moeplex.consolidate.similarity import FamilyExperts, OutputErrorModel, WeightDistances, weight_distances
from moeplex.demo.corpora import DOMAINS, domain_text
from moeplex.errors import MoeplexError

CALIBRATION_TOKENS_PER_DOMAIN = 1024


@dataclass(frozen=True)
class FamilySizes:
    """Bytes on disk: one whole model, one variant's backbone, one routed expert."""

    one_model: int
    backbone: int
    expert: int
    num_variants: int
    positions_per_variant: int

    def stored_bytes(self, stored_experts: int) -> int:
        return self.num_variants * self.backbone + stored_experts * self.expert

    def experts_within(self, budget_bytes: int) -> int:
        return max(0, (budget_bytes - self.num_variants * self.backbone) // self.expert)

    @property
    def smallest(self) -> int:
        return self.stored_bytes(self.positions_per_variant)

    @property
    def unshared(self) -> int:
        return self.stored_bytes(self.positions_per_variant * self.num_variants)


@dataclass
class FamilyAnalysis:
    variants: tuple[str, ...]
    base: str | None
    shape: PlanShape
    sizes: FamilySizes
    experts: FamilyExperts
    distances: WeightDistances
    errors: OutputErrorModel
    evaluator: Evaluator  # how this family's models are run: the moeplex runtime, or transformers for Switch

    def plan(self, method: str, budget_bytes: int) -> ConsolidationPlan:
        stored = self.sizes.experts_within(budget_bytes)
        if method == "l2-roundrobin":
            plan = l2_roundrobin_plan(self.shape, self.distances, stored)
        elif method == "quality-aware":
            plan = quality_aware_plan(self.shape, self.errors, stored, base=self.base)
        else:
            raise MoeplexError(f"unknown consolidation method '{method}' (quality-aware, l2-roundrobin)")
        plan.budget_bytes = budget_bytes
        return plan


def parse_budget(text: str, one_model_bytes: int) -> int:
    """'1.5x' (multiple of one model), '800MB', '2GiB' or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(x|b|kb|mb|gb|kib|mib|gib)?\s*", text.lower())
    if not match:
        raise MoeplexError(f"cannot read budget '{text}': use e.g. 1.5x, 800MB or 2GiB")
    value, unit = float(match.group(1)), match.group(2) or "b"
    if unit == "x":
        return int(value * one_model_bytes)
    scale = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}[unit]
    return int(value * scale)


def family_sizes(experts: FamilyExperts, variants: tuple[str, ...]) -> FamilySizes:
    reader, spec = experts.opened[variants[0]].reader, experts.spec(variants[0])
    one_model = sum(reader.nbytes(key) for key in reader.keys())
    expert = sum(w.numel() * w.element_size() for w in experts.read((variants[0], spec.sparse_layers.index(True), 0)).values())
    positions = sum(spec.sparse_layers) * spec.num_experts
    return FamilySizes(one_model, one_model - positions * expert, expert, len(variants), positions)


def calibration_tokens_by_domain(tokenizer_folder: Path, per_domain: int = CALIBRATION_TOKENS_PER_DOMAIN) -> dict[str, torch.Tensor]:
    """Demo domain -> the first per_domain tokens of its training-split text (never the held-out text of quality numbers)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    parts = {}
    for domain in DOMAINS:
        ids = tokenizer(domain_text(domain, "train", max_chars=per_domain * 8), add_special_tokens=False)["input_ids"]
        parts[domain] = torch.tensor(ids[:per_domain], dtype=torch.long)
    return parts


def calibration_tokens(tokenizer_folder: Path, per_domain: int = CALIBRATION_TOKENS_PER_DOMAIN) -> torch.Tensor:
    """Training-split text of every demo domain, one after another."""
    return torch.cat(list(calibration_tokens_by_domain(tokenizer_folder, per_domain).values()))


def analyse_family(family: FamilySpec, calibration: torch.Tensor | None = None, progress: bool = True) -> FamilyAnalysis:
    """Everything the planners need, computed one expert at a time from memory-mapped checkpoints.

    calibration: token ids to capture expert inputs on (default: training-split text of every demo domain).
    """
    checkpoints = family.checkpoints()
    base = BASE if family.base is not None else None
    variants = tuple(family.variants)
    experts = FamilyExperts(open_family(family))
    spec = experts.spec(variants[0])
    sparse = tuple(l for l, is_sparse in enumerate(spec.sparse_layers) if is_sparse)
    shape = PlanShape(variants, spec.num_layers, spec.num_experts, sparse)
    tokens = calibration if calibration is not None else calibration_tokens(checkpoints[variants[0]])
    evaluator = evaluator_for(experts.opened[variants[0]].family)
    inputs = {}
    for name in tqdm(variants, desc="calibration", unit="variant", disable=not progress):
        inputs[name] = evaluator.record_inputs(experts.opened[name], tokens)
    names = variants + ((base,) if base else ())
    distances = weight_distances(experts, names, progress)
    return FamilyAnalysis(
        variants,
        base,
        shape,
        family_sizes(experts, variants),
        experts,
        distances,
        OutputErrorModel(experts, inputs),
        evaluator,
    )
