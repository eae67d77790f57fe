"""Calibration pass: the hidden states that reach each expert of a variant, and how often it is routed to."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplex.model.attention import SequenceChunk
from moeplex.model.experts import ExpertCompute
from moeplex.model.runtime import MoEModel


@dataclass
class ExpertInputs:
    """Per sparse layer and expert: sampled inputs [n, H] and the fraction of token slots routed there."""

    inputs: dict[tuple[int, int], torch.Tensor]
    frequency: dict[tuple[int, int], float]


class ExpertInputSampler:
    """Keeps up to `cap` inputs per (layer, expert) and counts routed rows and token slots per layer."""

    def __init__(self, cap: int):
        self.cap = cap
        self.samples: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.kept: dict[tuple[int, int], int] = {}
        self.counts: dict[tuple[int, int], int] = {}
        self.slots: dict[int, int] = {}

    def add_slots(self, layer: int, count: int) -> None:
        """`count` routing slots (tokens x top-k) went through this layer's router."""
        self.slots[layer] = self.slots.get(layer, 0) + count

    def add(self, key: tuple[int, int], rows: torch.Tensor) -> None:
        """The inputs [n, H] that reached expert `key` in one call."""
        self.counts[key] = self.counts.get(key, 0) + rows.shape[0]
        room = self.cap - self.kept.get(key, 0)
        if room > 0:
            self.samples.setdefault(key, []).append(rows[:room].float().clone())
            self.kept[key] = self.kept.get(key, 0) + min(room, rows.shape[0])

    def result(self, sparse_layers: tuple[bool, ...], num_experts: int, hidden_size: int) -> ExpertInputs:
        inputs, frequency = {}, {}
        for layer, is_sparse in enumerate(sparse_layers):
            if not is_sparse:
                continue
            for expert in range(num_experts):
                key = (layer, expert)
                parts = self.samples.get(key)
                inputs[key] = torch.cat(parts) if parts else torch.empty(0, hidden_size)
                frequency[key] = self.counts.get(key, 0) / max(self.slots.get(layer, 0), 1)
        return ExpertInputs(inputs, frequency)


class InputRecorder:
    """An expert door that passes through and samples what reaches each (layer, expert)."""

    def __init__(self, inner: ExpertCompute, cap: int):
        self.inner = inner
        self.sampler = ExpertInputSampler(cap)

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        self.sampler.add_slots(layer, expert_ids.numel())
        for expert in torch.unique(expert_ids).tolist():
            rows = (expert_ids == expert).any(dim=1).nonzero().flatten()
            self.sampler.add((layer, expert), hidden[rows])
        return self.inner(layer, hidden, expert_ids, routing_weights)


def record_expert_inputs(model: MoEModel, token_ids: torch.Tensor, cap: int = 128, window: int = 256) -> ExpertInputs:
    """Run calibration tokens through the model in windows and record what reaches each expert."""
    recorder = InputRecorder(model.experts, cap)
    recording = MoEModel(model.spec, model.backbone, recorder, model.dtype, model.device)
    for start in range(0, token_ids.numel(), window):
        ids = token_ids[start : start + window]
        recording.forward(ids, [SequenceChunk(recording.new_cache(ids.numel()), 0, ids.numel())])
    spec = model.spec
    return recorder.sampler.result(spec.sparse_layers, spec.num_experts, spec.hidden_size)
