"""Routing frequency and quantization error per store expert id, pooled over every variant that shares the bank.

Selection policies are pure over any sortable keys; over a store they rank expert ids, so one choice holds
for every variant (a shared expert gets one precision). An id's frequency is the mean over variants of the
fraction of a layer's token slots routed to it (a uniform request mix); its error is measured on the
calibration inputs that reached it from any variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moeplex.consolidate.calibration import ExpertInputs, record_expert_inputs
from moeplex.model.runtime import MoEModel
from moeplex.quant.formats import DEFAULT_GROUP_SIZE
from moeplex.quant.output_error import expert_output_errors
from moeplex.store.experts import BANK_LAYER, ExpertBank
from moeplex.store.manifest import ExpertTable


@dataclass
class BankCalibration:
    frequency: dict[str, float]  # expert id -> mean fraction of its layer's token slots
    errors: dict[str, dict[str, float]]  # expert id -> precision -> relative output error

    def to_json(self) -> dict:
        return {"frequency": self.frequency, "errors": self.errors}

    @staticmethod
    def from_json(data: dict) -> BankCalibration:
        return BankCalibration(dict(data["frequency"]), {i: dict(e) for i, e in data["errors"].items()})


def calibrate_bank(
    models: dict[str, MoEModel],
    tables: dict[str, ExpertTable],
    bank: ExpertBank,
    texts: Mapping[str, torch.Tensor],
    group_size: int = DEFAULT_GROUP_SIZE,
    cap: int = 128,
    progress: bool = False,
    expert_errors: bool = True,
) -> BankCalibration:
    """Record what reaches each expert of each variant on its calibration tokens (texts[variant]), then measure
    int4/int8 error per id.

    The bank must still hold its dense experts; models are the variants' models over it. With expert_errors
    False only the frequencies are measured (errors left empty), for a caller that measures errors its own way.
    """
    samples: dict[str, list[torch.Tensor]] = {expert_id: [] for expert_id in bank.row_of}
    frequency = dict.fromkeys(bank.row_of, 0.0)
    for variant, model in models.items():
        recorded = record_expert_inputs(model, texts[variant], cap)
        for (layer, expert), x in recorded.inputs.items():
            expert_id = tables[variant][layer][expert]
            samples[expert_id].append(x)
            frequency[expert_id] += recorded.frequency[(layer, expert)] / len(models)
    if not expert_errors:
        return BankCalibration(frequency, {})
    hidden = bank.compute.gate_up[BANK_LAYER].shape[-1]
    by_row = {
        (BANK_LAYER, row): torch.cat(samples[expert_id]) if samples[expert_id] else torch.empty(0, hidden)
        for expert_id, row in bank.row_of.items()
    }
    inputs = ExpertInputs(by_row, {(BANK_LAYER, row): frequency[i] for i, row in bank.row_of.items()})
    errors = expert_output_errors(bank.compute, inputs, group_size=group_size, progress=progress)
    return BankCalibration(frequency, {expert_id: errors[(BANK_LAYER, row)] for expert_id, row in bank.row_of.items()})
