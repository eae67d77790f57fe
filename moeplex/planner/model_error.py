"""Least-error-first's error measured at the model's output: the KL one expert id causes when it alone is quantized.

The expert-local error (`moeplex.quant.output_error`: ||E_q(x) - E(x)|| / ||E(x)|| on the inputs that reached
the expert) does not see how large the expert's output is beside the residual stream, its gate weights or
how later layers carry the change; on the tiny family, ranking by it times routing frequency left the KL at
75% int4 only 12-20% below a random choice's (docs/benchmarks.md). Here each id is quantized on its own and every
variant that uses it scores its calibration text against its own all-bf16 predictions: one forward pass
over the calibration text per id, precision and variant that uses the id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from moeplex.quant.formats import QUANTIZED
from moeplex.store.manifest import ExpertTable

if TYPE_CHECKING:
    from moeplex.planner.meter import StoreMeter


def variants_using(tables: Mapping[str, ExpertTable]) -> dict[str, list[str]]:
    """Expert id -> the variants whose expert table names it."""
    users: dict[str, list[str]] = {}
    for variant, table in tables.items():
        for expert_id in sorted({i for layer in table if layer is not None for i in layer}):
            users.setdefault(expert_id, []).append(variant)
    return users


def model_output_errors(
    meter: StoreMeter, texts: Mapping[str, torch.Tensor], frequency: Mapping[str, float], precisions: tuple[str, ...] = QUANTIZED
) -> dict[str, dict[str, float]]:
    """Expert id -> precision -> the KL from all bf16 (per calibration token of texts[variant], mean over variants)
    with only that id quantized, per unit of the id's routing frequency.

    Divided by frequency so that least-error-first's cost, error x frequency, is that KL. An id that no
    calibration token reached changes nothing and gets 0.
    """
    users = variants_using(meter.tables)
    errors: dict[str, dict[str, float]] = {}
    for expert_id in tqdm(meter.expert_ids, desc="quantization error at the output", unit="expert"):
        if frequency[expert_id] <= 0:
            errors[expert_id] = dict.fromkeys(precisions, 0.0)
            continue
        errors[expert_id] = {}
        for precision in precisions:
            meter.use({expert_id: precision})
            scores = meter.quality_by_variant(texts, users[expert_id])
            mean_kl = sum(kl for _, kl in scores.values()) / len(meter.models)  # variants not using it: 0
            errors[expert_id][precision] = mean_kl / frequency[expert_id]
    meter.use({})
    return errors
