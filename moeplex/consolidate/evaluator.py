"""How consolidation runs a family's models: the moeplex runtime (decoder-only) or transformers (Switch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moeplex.consolidate.calibration import ExpertInputs, record_expert_inputs
from moeplex.consolidate.family_spec import OpenCheckpoint
from moeplex.consolidate.plan import ConsolidationPlan
from moeplex.consolidate.similarity import FamilyExperts
from moeplex.consolidate.switch_calibration import record_switch_expert_inputs
from moeplex.consolidate.switch_models import consolidated_switch, load_switch, seq2seq_predictions
from moeplex.consolidate.variant_models import consolidated_model
from moeplex.eval.perplexity import PredictFn, causal_predictions, runtime_logits
from moeplex.model.runtime import load_model


@dataclass(frozen=True)
class Evaluator:
    """Loads checkpoints, builds a plan's consolidated variants, scores windows and captures expert inputs."""

    task: str  # what the quality numbers measure, for the report
    load: Callable[[Path, torch.dtype], object]
    consolidated: Callable[[ConsolidationPlan, str, FamilyExperts, torch.dtype], object]
    predictions: Callable[[object], PredictFn]
    record_inputs: Callable[[OpenCheckpoint, torch.Tensor], ExpertInputs]


RUNTIME = Evaluator(
    task="next-token prediction through the moeplex runtime",
    load=lambda folder, dtype: load_model(folder, dtype=dtype),
    consolidated=consolidated_model,
    predictions=lambda model: causal_predictions(runtime_logits(model)),
    record_inputs=lambda checkpoint, tokens: record_expert_inputs(
        load_model(checkpoint.reader.folder, dtype=torch.float32), tokens
    ),
)

SWITCH = Evaluator(
    task="continuation through transformers: the encoder reads each window's first half, the decoder predicts "
    "the second half (the numbers are over the decoder's predictions)",
    load=load_switch,
    consolidated=consolidated_switch,
    predictions=seq2seq_predictions,
    record_inputs=lambda checkpoint, tokens: record_switch_expert_inputs(
        load_switch(checkpoint.reader.folder, torch.float32), checkpoint.spec, tokens
    ),
)


def evaluator_for(family) -> Evaluator:
    return SWITCH if family.is_encoder_decoder else RUNTIME
