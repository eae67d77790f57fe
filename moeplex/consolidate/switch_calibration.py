"""Calibration for Switch Transformers: what reaches each expert, captured by forward hooks in transformers."""

from __future__ import annotations

import torch

from moeplex.consolidate.calibration import ExpertInputs, ExpertInputSampler
from moeplex.consolidate.switch_models import seq2seq_predictions
from moeplex.eval.perplexity import token_windows
from moeplex.families.switch_transformers import SwitchSpec, expert_path, feed_forward_path


def record_switch_expert_inputs(
    model, spec: SwitchSpec, token_ids: torch.Tensor, cap: int = 128, window: int = 256
) -> ExpertInputs:
    """Run the calibration tokens through the continuation task and record the inputs of every expert.

    An expert's inputs are the normed hidden states its router sent to it (tokens over the expert
    capacity reach none); its frequency is the fraction of the layer's tokens it received.
    """
    sampler = ExpertInputSampler(cap)
    handles = []
    for layer in (l for l, sparse in enumerate(spec.sparse_layers) if sparse):
        feed_forward = model.get_submodule(feed_forward_path(spec, layer))
        handles.append(feed_forward.register_forward_pre_hook(_slot_counter(sampler, layer)))
        for expert in range(spec.num_experts):
            module = model.get_submodule(expert_path(spec, layer, expert))
            handles.append(module.register_forward_pre_hook(_input_sampler(sampler, (layer, expert))))
    try:
        predict = seq2seq_predictions(model)
        for chunk in token_windows(token_ids, window):
            predict(chunk)
    finally:
        for handle in handles:
            handle.remove()
    return sampler.result(spec.sparse_layers, spec.num_experts, spec.hidden_size)


def _slot_counter(sampler: ExpertInputSampler, layer: int):
    def hook(module, args):
        sampler.add_slots(layer, args[0].shape[:-1].numel())  # top-1: one slot per token

    return hook


def _input_sampler(sampler: ExpertInputSampler, key: tuple[int, int]):
    def hook(module, args):
        sampler.add(key, args[0].reshape(-1, args[0].shape[-1]))

    return hook
