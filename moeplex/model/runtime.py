"""The MoE decoder forward pass over a flat batch of tokens from many sequences."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from moeplex.model.attention import SequenceChunk, attention
from moeplex.model.experts import ExpertCompute
from moeplex.model.kv_cache import SequenceKVCache
from moeplex.model.ops import linear, rms_norm, swiglu_mlp
from moeplex.model.rope import RotaryEmbedding
from moeplex.model.spec import ModelSpec
from moeplex.model.weights import Backbone, LayerWeights, load_backbone, load_dense_experts, open_checkpoint


def route(spec: ModelSpec, x: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing: expert ids [T, k] and their float32 weights [T, k]."""
    probs = torch.softmax(linear(x, router).float(), dim=-1)  # [T, E]
    weights, expert_ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.normalize_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return expert_ids, weights


class MoEModel:
    """One variant's backbone plus an expert door; stateless apart from the rope table."""

    def __init__(self, spec: ModelSpec, backbone: Backbone, experts: ExpertCompute, dtype: torch.dtype, device="cpu"):
        self.spec, self.backbone, self.experts = spec, backbone, experts
        self.dtype, self.device = dtype, torch.device(device)
        self.rope = RotaryEmbedding(spec, device=self.device)

    def new_cache(self, capacity: int = 64) -> SequenceKVCache:
        return SequenceKVCache(self.spec, self.dtype, self.device, capacity)

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, chunks: list[SequenceChunk], all_logits: bool = False) -> torch.Tensor:
        """Run token_ids [T] (each chunk's tokens contiguous, in order) through the model.

        Returns float32 logits: [T, V] if all_logits, else [len(chunks), V] for each chunk's last token.
        Each chunk's cache must hold its first `start` positions; it then holds start+num_tokens.
        """
        for chunk in chunks:
            chunk.cache.reserve(chunk.start + chunk.num_tokens)
        positions = chunk_positions(chunks).to(self.device)
        cos, sin = self.rope.cos_sin(positions, self.dtype)
        h = F.embedding(token_ids.to(self.device), self.backbone.embed)  # [T, H]
        h = decoder_layers(self.spec, self.backbone.layers, h, cos, sin, chunks, self.experts)
        for chunk in chunks:
            chunk.cache.length = chunk.start + chunk.num_tokens
        if not all_logits:
            h = h[last_token_rows(chunks).to(self.device)]
        h = rms_norm(h, self.backbone.final_norm, self.spec.rms_norm_eps)
        return linear(h, self.backbone.lm_head).float()


def decoder_layers(
    spec: ModelSpec, layers: list[LayerWeights], h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunks: list[SequenceChunk], experts: ExpertCompute
) -> torch.Tensor:
    """The residual stream h [T, H] after every decoder layer (attention, then the dense or routed MLP).

    An expert door with an `after_layer(layer, h)` method (one that prefetches) is told each layer's output.
    """
    after_layer = getattr(experts, "after_layer", None)
    for layer, weights in enumerate(layers):
        x = rms_norm(h, weights.attn_norm, spec.rms_norm_eps)
        h = h + attention(spec, layer, x, weights.attention, cos, sin, chunks)
        x = rms_norm(h, weights.mlp_norm, spec.rms_norm_eps)
        h = h + feed_forward(spec, layer, weights, x, experts)
        if after_layer is not None:
            after_layer(layer, h)
    return h


def feed_forward(spec: ModelSpec, layer: int, weights: LayerWeights, x: torch.Tensor, experts: ExpertCompute) -> torch.Tensor:
    """The layer's MLP on normalized x [T, H]: dense, or routed experts plus the shared expert when there is one."""
    if weights.router is None:
        return swiglu_mlp(x, weights.dense_mlp.gate_up, weights.dense_mlp.down)
    expert_ids, routing_weights = route(spec, x, weights.router)
    return add_shared_expert(experts(layer, x, expert_ids, routing_weights), weights, x)


def chunk_positions(chunks: list[SequenceChunk]) -> torch.Tensor:
    """Position of every token of the flat batch [T]."""
    return torch.cat([torch.arange(c.start, c.start + c.num_tokens) for c in chunks])


def last_token_rows(chunks: list[SequenceChunk]) -> torch.Tensor:
    """Row of each chunk's last token in the flat batch [len(chunks)]."""
    return torch.cumsum(torch.tensor([c.num_tokens for c in chunks]), 0) - 1


def add_shared_expert(routed: torch.Tensor, weights: LayerWeights, x: torch.Tensor) -> torch.Tensor:
    """routed [T, H] plus the layer's (optionally gated) shared expert on x [T, H], when it has one."""
    if weights.shared_expert is None:
        return routed
    shared = swiglu_mlp(x, weights.shared_expert.gate_up, weights.shared_expert.down)
    if weights.shared_expert_gate is not None:
        shared = torch.sigmoid(linear(x, weights.shared_expert_gate)) * shared
    return routed + shared


def load_model(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device="cpu", progress=False) -> MoEModel:
    """A fully resident model from a Hugging Face checkpoint folder."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        raise ValueError("float16 is not supported on CPU (too slow); use bfloat16 or float32")
    family, reader, spec = open_checkpoint(folder)
    backbone = load_backbone(family, reader, spec, dtype, device)
    experts = load_dense_experts(family, reader, spec, dtype, device, progress=progress)
    return MoEModel(spec, backbone, experts, dtype, device)
