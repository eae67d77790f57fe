"""Switch Transformers through transformers: load a checkpoint, build a consolidated variant, score continuations.

The quality task for an encoder-decoder model: each window of token ids is cut in two; the encoder
reads the first half and the decoder, starting from the decoder start token (the pad token, as in
T5), predicts the second half. Perplexity, KL and greedy agreement are over those predictions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import SwitchTransformersForConditionalGeneration

from moeplex.consolidate.plan import ConsolidationPlan
from moeplex.consolidate.similarity import FamilyExperts
from moeplex.eval.perplexity import PredictFn
from moeplex.store.materialize import materialize_expert


def load_switch(folder: Path, dtype: torch.dtype = torch.float32) -> SwitchTransformersForConditionalGeneration:
    return SwitchTransformersForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()


def consolidated_switch(
    plan: ConsolidationPlan, variant: str, experts: FamilyExperts, dtype: torch.dtype = torch.float32
) -> SwitchTransformersForConditionalGeneration:
    """Variant `variant` as its export from a store written with this plan: its own backbone, the plan's experts."""
    checkpoint = experts.opened[variant]
    family, spec = checkpoint.family, checkpoint.spec
    model = load_switch(checkpoint.reader.folder, dtype)
    tensors = {}
    for layer in plan.sparse_layers:
        for expert in range(plan.num_experts):
            weights = materialize_expert(plan.groups[plan.assignment[(variant, layer, expert)]], experts.read)
            tensors |= family.saved_expert_tensors(spec, layer, expert, weights)
    loaded = model.load_state_dict(tensors, strict=False)
    if loaded.unexpected_keys:
        raise KeyError(f"expert keys that {type(model).__name__} does not have: {loaded.unexpected_keys[:3]}")
    return model


def seq2seq_predictions(model: SwitchTransformersForConditionalGeneration) -> PredictFn:
    """The encoder reads a window's first half; the decoder's logits predict the second half."""
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    start = start if start is not None else (config.pad_token_id or 0)

    def predict(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        split = chunk.numel() // 2
        source, target = chunk[:split], chunk[split:]
        decoder_input = torch.cat([target.new_tensor([start]), target[:-1]])
        with torch.inference_mode():
            logits = model(input_ids=source[None], decoder_input_ids=decoder_input[None]).logits[0]
        return logits.float(), target

    return predict
