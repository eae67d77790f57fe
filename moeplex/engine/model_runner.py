"""One forward pass over a batch that mixes variants: per-variant backbone layers, experts grouped by store id."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.model.attention import SequenceChunk, attention
from moeplex.model.ops import linear, rms_norm, swiglu_mlp
from moeplex.model.rope import RotaryEmbedding
from moeplex.model.runtime import add_shared_expert, chunk_positions, last_token_rows, route
from moeplex.model.spec import ModelSpec
from moeplex.model.weights import Backbone
from moeplex.store.experts import BANK_LAYER, ExpertBank


@dataclass
class VariantGroup:
    """The step's sequences of one variant: their new tokens [n] (chunks contiguous, in order) and chunks."""

    variant: str
    backbone: Backbone
    token_ids: torch.Tensor
    chunks: list[SequenceChunk]


class MixedVariantRunner:
    """Runs the decoder over groups of several variants in one step.

    Embeddings, attention, norms, routers, shared experts and lm_head use each group's own backbone.
    Routed experts run once per layer for all tokens of the step: each variant's router choice
    (layer, e) becomes a row of the shared expert bank, so tokens of different variants routed to the
    same stored expert are one matmul.
    """

    def __init__(self, spec: ModelSpec, bank: ExpertBank, bank_rows: dict[str, list[torch.Tensor | None]], dtype: torch.dtype, device="cpu"):
        self.spec, self.bank, self.bank_rows = spec, bank, bank_rows
        self.dtype, self.device = dtype, torch.device(device)
        self.rope = RotaryEmbedding(spec, device=self.device)

    @torch.inference_mode()
    def forward(self, groups: list[VariantGroup]) -> list[torch.Tensor]:
        """Float32 logits [len(group.chunks), V] of each chunk's last token, per group."""
        spec = self.spec
        rotary = []
        for group in groups:
            for chunk in group.chunks:
                chunk.cache.reserve(chunk.start + chunk.num_tokens)
            rotary.append(self.rope.cos_sin(chunk_positions(group.chunks).to(self.device), self.dtype))
        hidden = [F.embedding(g.token_ids.to(self.device), g.backbone.embed) for g in groups]  # [n_g, H] each
        for layer in range(spec.num_layers):
            for i, (group, (cos, sin)) in enumerate(zip(groups, rotary)):
                weights = group.backbone.layers[layer]
                x = rms_norm(hidden[i], weights.attn_norm, spec.rms_norm_eps)
                hidden[i] = hidden[i] + attention(spec, layer, x, weights.attention, cos, sin, group.chunks)
            normed = [rms_norm(h, g.backbone.layers[layer].mlp_norm, spec.rms_norm_eps) for g, h in zip(groups, hidden)]
            for i, out in enumerate(self._feed_forward(layer, groups, normed)):
                hidden[i] = hidden[i] + out
        logits = []
        for group, h in zip(groups, hidden):
            for chunk in group.chunks:
                chunk.cache.length = chunk.start + chunk.num_tokens
            last = rms_norm(h[last_token_rows(group.chunks).to(self.device)], group.backbone.final_norm, spec.rms_norm_eps)
            logits.append(linear(last, group.backbone.lm_head).float())
        return logits

    def _feed_forward(self, layer: int, groups: list[VariantGroup], normed: list[torch.Tensor]) -> list[torch.Tensor]:
        layer_weights = [g.backbone.layers[layer] for g in groups]
        if layer_weights[0].router is None:
            return [swiglu_mlp(x, w.dense_mlp.gate_up, w.dense_mlp.down) for w, x in zip(layer_weights, normed)]
        rows, routing = [], []
        for group, weights, x in zip(groups, layer_weights, normed):
            expert_ids, routing_weights = route(self.spec, x, weights.router)  # [n_g, k] each
            rows.append(self.bank_rows[group.variant][layer][expert_ids])
            routing.append(routing_weights)
        routed = self.bank.compute(BANK_LAYER, torch.cat(normed), torch.cat(rows), torch.cat(routing))  # [T, H]
        outputs = torch.split(routed, [x.shape[0] for x in normed])
        return [add_shared_expert(out, w, x) for out, w, x in zip(outputs, layer_weights, normed)]
