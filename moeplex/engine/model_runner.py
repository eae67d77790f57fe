"""One forward pass over a batch that mixes variants: backbone work once for all tokens, experts grouped by store id."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplex.engine.experts import RoutedTokens, StepExperts
from moeplex.engine.step_weights import StepWeights, VariantStacks
from moeplex.model.attention import SequenceChunk
from moeplex.model.ops import linear, rms_norm
from moeplex.model.rope import RotaryEmbedding
from moeplex.model.runtime import chunk_positions, decoder_layers, last_token_rows
from moeplex.model.spec import ModelSpec
from moeplex.model.weights import Backbone
from moeplex.store.experts import ExpertBank


@dataclass
class VariantGroup:
    """The step's sequences of one variant: their new tokens [n] (chunks contiguous, in order) and chunks."""

    variant: str
    backbone: Backbone
    token_ids: torch.Tensor
    chunks: list[SequenceChunk]


class MixedVariantRunner:
    """Runs the decoder over groups of several variants in one step.

    The step's tokens form one flat batch, groups in stack-slot order. Every backbone operation runs
    once over it (`moeplex.engine.step_weights`): tensors the variants share as they are, differing
    matrices as grouped matmuls over the variants' rows, differing vectors as one row per token.
    Routed experts run once per layer for all tokens through the expert door (`moeplex.engine.experts`):
    each variant's router choice (layer, e) becomes a stored expert, so tokens of different variants
    routed to the same stored expert are one matmul.
    """

    def __init__(self, spec: ModelSpec, experts: StepExperts, dtype: torch.dtype, device="cpu"):
        self.spec, self.experts = spec, experts
        self.dtype, self.device = dtype, torch.device(device)
        self.rope = RotaryEmbedding(spec, device=self.device)
        self.step_weights = StepWeights(spec)

    def stack_backbones(self, backbones: dict[str, Backbone]) -> None:
        """Stack the differing tensors of backbones that stay resident (every variant's, in the engine's order)."""
        self.step_weights = StepWeights(self.spec, VariantStacks(backbones))

    @property
    def bank(self) -> ExpertBank | None:
        """The resident expert bank; None when experts are offloaded."""
        return getattr(self.experts, "bank", None)

    def ordered(self, variants: list[str]) -> list[str]:
        """The order in which a step's variant groups must be given to forward."""
        return self.step_weights.ordered(variants)

    @torch.inference_mode()
    def forward(self, groups: list[VariantGroup]) -> list[torch.Tensor]:
        """Float32 logits [len(group.chunks), V] of each chunk's last token, per group; groups in `ordered` order."""
        if [g.variant for g in groups] != self.ordered([g.variant for g in groups]):
            raise ValueError("variant groups must come in the runner's order (MixedVariantRunner.ordered)")
        chunks = [chunk for group in groups for chunk in group.chunks]
        for chunk in chunks:
            chunk.cache.reserve(chunk.start + chunk.num_tokens)
        token_ids = torch.cat([g.token_ids for g in groups]).to(self.device)
        sizes = [g.token_ids.shape[0] for g in groups]
        step = self.step_weights.build(
            [g.variant for g in groups], [g.backbone for g in groups], sizes, [len(g.chunks) for g in groups], token_ids
        )
        cos, sin = self.rope.cos_sin(chunk_positions(chunks).to(self.device), self.dtype)

        h = decoder_layers(self.spec, step.layers, step.embedded, cos, sin, chunks, GroupedExpertDoor(self.experts, groups, sizes))
        for chunk in chunks:
            chunk.cache.length = chunk.start + chunk.num_tokens
        last = h[last_token_rows(chunks).to(self.device)]
        logits = linear(rms_norm(last, step.final_norm, self.spec.rms_norm_eps), step.lm_head).float()
        return list(torch.split(logits, [len(g.chunks) for g in groups]))


class GroupedExpertDoor:
    """The runtime's expert door over a step's variant groups: splits the flat batch into each group's rows."""

    def __init__(self, experts: StepExperts, groups: list[VariantGroup], sizes: list[int]):
        self.experts, self.groups, self.sizes = experts, groups, sizes

    def __call__(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        parts = zip(self.groups, *(torch.split(t, self.sizes) for t in (x, expert_ids, routing_weights)))
        return self.experts(layer, [RoutedTokens(g.variant, h, ids, w) for g, h, ids, w in parts])

    def after_layer(self, layer: int, residual: torch.Tensor) -> None:
        """Hand each group's rows of the layer's output to a door that prefetches (one with `after_layer`)."""
        after_layer = getattr(self.experts, "after_layer", None)
        if after_layer is not None:
            after_layer(layer, {g.variant: h for g, h in zip(self.groups, torch.split(residual, self.sizes))})
