"""Switch Transformers (encoder-decoder, top-1 routing): checkpoint keys -> expert positions and backbone.

Expert positions number the blocks of both stacks in one sequence: layer l < num_encoder_layers is
encoder block l, the rest are decoder blocks (layer num_encoder_layers + j is decoder block j). A
sparse block's feed-forward holds `experts.expert_{e}.wi` [d_ff, d_model] and `.wo` [d_model, d_ff]
(no gate; wo(act(wi x)) with the config's dense_act_fn) behind `router.classifier`. Everything else
is backbone, stored under the very keys transformers saves. The moeplex runtime does not run this
family (it serves decoder-only models); consolidation evaluates it through transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN

from moeplex.checkpoint import CheckpointReader
from moeplex.errors import CheckpointError
from moeplex.families.base import check_shape

STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class SwitchSpec:
    """Shapes of a Switch Transformers checkpoint, under its Hugging Face config's names where it has them."""

    family: str
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_heads: int
    num_encoder_layers: int  # the config's num_layers
    num_decoder_layers: int
    num_experts: int
    sparse_layers: tuple[bool, ...]  # encoder blocks, then decoder blocks
    dense_act_fn: str
    relative_attention_num_buckets: int
    router_bias: bool
    tie_word_embeddings: bool

    @property
    def num_layers(self) -> int:
        """Blocks of both stacks: the layer axis of expert positions."""
        return self.num_encoder_layers + self.num_decoder_layers

    @property
    def hidden_size(self) -> int:
        return self.d_model

    def block(self, layer: int) -> tuple[str, int]:
        """('encoder' or 'decoder', block index in that stack) of a position's layer."""
        if layer < self.num_encoder_layers:
            return "encoder", layer
        return "decoder", layer - self.num_encoder_layers


def spec_from_config(config: dict) -> SwitchSpec:
    encoder_layers = config["num_layers"]
    decoder_layers = config.get("num_decoder_layers") or encoder_layers
    encoder_step = _sparse_step(config, "encoder", encoder_layers)
    decoder_step = _sparse_step(config, "decoder", decoder_layers)
    return SwitchSpec(
        family="switch_transformers",
        vocab_size=config["vocab_size"],
        d_model=config["d_model"],
        d_kv=config["d_kv"],
        d_ff=config["d_ff"],
        num_heads=config["num_heads"],
        num_encoder_layers=encoder_layers,
        num_decoder_layers=decoder_layers,
        num_experts=config["num_experts"],
        sparse_layers=_sparse_pattern(encoder_layers, encoder_step) + _sparse_pattern(decoder_layers, decoder_step),
        dense_act_fn=config.get("dense_act_fn", "relu"),
        relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
        router_bias=bool(config.get("router_bias", False)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def _sparse_step(config: dict, stack: str, layers: int) -> int:
    """Every how many blocks a stack is sparse: the saved step, else what the config class derives."""
    step = config.get(f"{stack}_sparse_step")
    if step is not None:
        return step
    sparse = config.get(f"num_sparse_{stack}_layers", 3)
    return layers // sparse if sparse > 0 else layers


def _sparse_pattern(layers: int, step: int) -> tuple[bool, ...]:
    """Which blocks of one stack are sparse, by transformers' rule (block i when i % step == 1, all when step is 1)."""
    return tuple((i % step == 1 or step == 1) if step > 0 else False for i in range(layers))


def feed_forward_path(spec: SwitchSpec, layer: int) -> str:
    """Module path of a block's feed-forward: sublayer 1 in the encoder, 2 in the decoder (after cross-attention)."""
    stack, block = spec.block(layer)
    return f"{stack}.block.{block}.layer.{1 if stack == 'encoder' else 2}.mlp"


def expert_path(spec: SwitchSpec, layer: int, expert: int) -> str:
    """Module path of one routed expert in transformers' SwitchTransformersForConditionalGeneration."""
    return f"{feed_forward_path(spec, layer)}.experts.expert_{expert}"


def backbone_shapes(spec: SwitchSpec) -> dict[str, tuple[int, ...]]:
    """Every backbone tensor's key (as transformers saves it) and shape, in a fixed order."""
    h, inner, v = spec.d_model, spec.num_heads * spec.d_kv, spec.vocab_size
    shapes = {"shared.weight": (v, h)}
    if not spec.tie_word_embeddings:  # untied: each stack has its own embedding, and there is an lm_head
        shapes |= {f"{stack}.embed_tokens.weight": (v, h) for stack in STACKS} | {"lm_head.weight": (v, h)}
    for layer in range(spec.num_layers):
        stack, block = spec.block(layer)
        prefix = f"{stack}.block.{block}.layer"
        attentions = [("0.SelfAttention", "0")] + ([("1.EncDecAttention", "1")] if stack == "decoder" else [])
        for attention, norm in attentions:
            shapes |= {f"{prefix}.{attention}.{p}.weight": (inner, h) for p in ("q", "k", "v")}
            shapes[f"{prefix}.{attention}.o.weight"] = (h, inner)
            if block == 0 and attention.endswith("SelfAttention"):
                shapes[f"{prefix}.{attention}.relative_attention_bias.weight"] = (
                    spec.relative_attention_num_buckets,
                    spec.num_heads,
                )
            shapes[f"{prefix}.{norm}.layer_norm.weight"] = (h,)
        mlp = feed_forward_path(spec, layer)
        shapes[mlp.removesuffix(".mlp") + ".layer_norm.weight"] = (h,)
        if spec.sparse_layers[layer]:
            shapes[f"{mlp}.router.classifier.weight"] = (spec.num_experts, h)
            if spec.router_bias:
                shapes[f"{mlp}.router.classifier.bias"] = (spec.num_experts,)
        else:
            shapes |= {f"{mlp}.wi.weight": (spec.d_ff, h), f"{mlp}.wo.weight": (h, spec.d_ff)}
    for stack in STACKS:
        shapes[f"{stack}.final_layer_norm.weight"] = (h,)
    return shapes


@dataclass(frozen=True)
class SwitchFamily:
    """The members of `moeplex.families.base.Family` that consolidation and the store use, for Switch."""

    name: str = "switch_transformers"
    model_types: tuple[str, ...] = ("switch_transformers",)
    hf_architecture: str = "SwitchTransformersForConditionalGeneration"

    is_encoder_decoder = True
    expert_parts = ("wi", "wo")

    @staticmethod
    def spec_from_config(config: dict) -> SwitchSpec:
        return spec_from_config(config)

    def backbone_names(self, spec: SwitchSpec) -> list[str]:
        return list(backbone_shapes(spec))

    def backbone_key(self, reader: CheckpointReader, name: str) -> str:
        """Backbone names are checkpoint keys already."""
        if not reader.has(name):
            raise CheckpointError(f"{reader.folder}: tensor '{name}' ({self.name}) is not in the checkpoint")
        return name

    def backbone_shape(self, spec: SwitchSpec, name: str) -> tuple[int, ...]:
        return backbone_shapes(spec)[name]

    def saved_backbone_key(self, name: str) -> str:
        return name

    def read_expert(
        self, reader: CheckpointReader, spec: SwitchSpec, layer: int, expert: int
    ) -> dict[str, torch.Tensor]:
        """One routed expert as {"wi": [d_ff, d_model], "wo": [d_model, d_ff]}, read lazily from disk."""
        path = expert_path(spec, layer, expert)
        shapes = {"wi": (spec.d_ff, spec.d_model), "wo": (spec.d_model, spec.d_ff)}
        weights = {}
        for part, shape in shapes.items():
            key = f"{path}.{part}.weight"
            if not reader.has(key):
                raise CheckpointError(f"{reader.folder}: expert tensor '{key}' is not in the checkpoint")
            weights[part] = reader.get(key)
            check_shape(reader, key, weights[part], shape)
        return weights

    def saved_expert_tensors(
        self, spec: SwitchSpec, layer: int, expert: int, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        path = expert_path(spec, layer, expert)
        return {f"{path}.{part}.weight": weights[part].clone() for part in self.expert_parts}

    def expert_output(self, spec: SwitchSpec, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The expert applied to inputs x [n, d_model], in fp32: wo(act(wi x))."""
        return ACT2FN[spec.dense_act_fn](x.float() @ weights["wi"].float().T) @ weights["wo"].float().T


FAMILY = SwitchFamily()
