"""One forward pass over a batch that mixes variants: backbone work grouped by weights, experts by store id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.engine.experts import RoutedTokens, StepExperts
from moeplex.model.attention import SequenceChunk, attention
from moeplex.model.ops import linear, rms_norm, swiglu_mlp
from moeplex.model.rope import RotaryEmbedding
from moeplex.model.runtime import add_shared_expert, chunk_positions, last_token_rows, route
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


def run_by_weights(keys: list[tuple], fn: Callable[..., tuple[torch.Tensor, ...]], *inputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """Call fn(members, *inputs joined) once per class of groups with equal keys; its outputs are split per group.

    A key names the weight tensors an operation uses (by identity), so groups of variants that share
    those tensors run as one batch.
    """
    classes: dict[tuple, list[int]] = {}
    for index, key in enumerate(keys):
        classes.setdefault(key, []).append(index)
    outputs: list[tuple[torch.Tensor, ...]] = [()] * len(keys)
    for members in classes.values():
        joined = [group_inputs[members[0]] if len(members) == 1 else torch.cat([group_inputs[m] for m in members]) for group_inputs in inputs]
        results = fn(members, *joined)
        sizes = [inputs[0][m].shape[0] for m in members]
        for m, parts in zip(members, zip(*(torch.split(r, sizes) for r in results))):
            outputs[m] = parts
    return outputs


def identities(*tensors: torch.Tensor | None) -> tuple:
    return tuple(id(t) for t in tensors)


class MixedVariantRunner:
    """Runs the decoder over groups of several variants in one step.

    Embeddings, attention, norms, routers, shared experts and lm_head use each group's own backbone;
    groups whose tensors for an operation are the same (see IdenticalTensorPool) run it together.
    Routed experts run once per layer for all tokens of the step through the expert door
    (`moeplex.engine.experts`): each variant's router choice (layer, e) becomes a stored expert, so
    tokens of different variants routed to the same stored expert are one matmul.
    """

    def __init__(self, spec: ModelSpec, experts: StepExperts, dtype: torch.dtype, device="cpu"):
        self.spec, self.experts = spec, experts
        self.dtype, self.device = dtype, torch.device(device)
        self.rope = RotaryEmbedding(spec, device=self.device)

    @property
    def bank(self) -> ExpertBank | None:
        """The resident expert bank; None when experts are offloaded."""
        return getattr(self.experts, "bank", None)

    @torch.inference_mode()
    def forward(self, groups: list[VariantGroup]) -> list[torch.Tensor]:
        """Float32 logits [len(group.chunks), V] of each chunk's last token, per group."""
        spec, eps = self.spec, self.spec.rms_norm_eps
        for group in groups:
            for chunk in group.chunks:
                chunk.cache.reserve(chunk.start + chunk.num_tokens)
        rotary = [self.rope.cos_sin(chunk_positions(g.chunks).to(self.device), self.dtype) for g in groups]
        cos, sin = [c for c, _ in rotary], [s for _, s in rotary]
        tokens = [g.token_ids.to(self.device) for g in groups]
        embed_keys = [identities(g.backbone.embed) for g in groups]
        hidden = [h for (h,) in run_by_weights(embed_keys, lambda m, t: (F.embedding(t, groups[m[0]].backbone.embed),), tokens)]
        for layer in range(spec.num_layers):
            weights = [g.backbone.layers[layer] for g in groups]
            hidden = self._attention(layer, groups, weights, hidden, cos, sin)
            hidden = [h + out for h, out in zip(hidden, self._feed_forward(layer, groups, weights, hidden))]
        for group in groups:
            for chunk in group.chunks:
                chunk.cache.length = chunk.start + chunk.num_tokens
        last = [h[last_token_rows(g.chunks).to(self.device)] for g, h in zip(groups, hidden)]

        def head(members, h):
            backbone = groups[members[0]].backbone
            return (linear(rms_norm(h, backbone.final_norm, eps), backbone.lm_head).float(),)

        return [logits for (logits,) in run_by_weights([identities(g.backbone.final_norm, g.backbone.lm_head) for g in groups], head, last)]

    def _attention(self, layer: int, groups: list[VariantGroup], weights, hidden, cos, sin) -> list[torch.Tensor]:
        """Residual stream after the layer's attention, one call per class of groups sharing attention weights."""

        def attend(members, h, c, s):
            w = weights[members[0]]
            chunks = [chunk for m in members for chunk in groups[m].chunks]
            return (h + attention(self.spec, layer, rms_norm(h, w.attn_norm, self.spec.rms_norm_eps), w.attention, c, s, chunks),)

        keys = [identities(w.attn_norm, *vars(w.attention).values()) for w in weights]
        return [h for (h,) in run_by_weights(keys, attend, hidden, cos, sin)]

    def _feed_forward(self, layer: int, groups: list[VariantGroup], weights, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        eps = self.spec.rms_norm_eps
        normed = [x for (x,) in run_by_weights([identities(w.mlp_norm) for w in weights], lambda m, h: (rms_norm(h, weights[m[0]].mlp_norm, eps),), hidden)]
        if weights[0].router is None:
            keys = [identities(w.dense_mlp.gate_up, w.dense_mlp.down) for w in weights]
            return [y for (y,) in run_by_weights(keys, lambda m, x: (swiglu_mlp(x, weights[m[0]].dense_mlp.gate_up, weights[m[0]].dense_mlp.down),), normed)]
        routing = run_by_weights([identities(w.router) for w in weights], lambda m, x: route(self.spec, x, weights[m[0]].router), normed)
        routed = self.experts(layer, [RoutedTokens(g.variant, x, ids, w) for g, x, (ids, w) in zip(groups, normed, routing)])  # [T, H]
        routed = list(torch.split(routed, [x.shape[0] for x in normed]))
        if weights[0].shared_expert is None:
            return routed
        keys = [identities(w.shared_expert.gate_up, w.shared_expert.down, w.shared_expert_gate) for w in weights]
        return [y for (y,) in run_by_weights(keys, lambda m, out, x: (add_shared_expert(out, weights[m[0]], x),), routed, normed)]
