"""What a family module provides: config -> ModelSpec, and canonical tensor names -> checkpoint keys.

Consolidation and the store use a family through these members only: name, model_types,
hf_architecture, is_encoder_decoder, expert_parts, spec_from_config, backbone_names, backbone_key,
backbone_shape, read_expert, expert_output, saved_backbone_key and saved_expert_tensors.
`moeplex.families.switch_transformers` provides them for an encoder-decoder family that the runtime
does not run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeplex.checkpoint import CheckpointReader
from moeplex.errors import CheckpointError, UnsupportedModelError
from moeplex.model.ops import swiglu_mlp
from moeplex.model.spec import ModelSpec

# Canonical backbone tensor names. Per-layer names are prefixed "layers.{l}.".
GLOBAL_TENSORS = ("embed", "final_norm", "lm_head")


@dataclass(frozen=True)
class ExpertKeys:
    """Where a routed expert's weights live in a checkpoint, in either layout transformers uses.

    per_expert: one key per expert and projection (what transformers saves by default), with
        {l}, {e} and {proj} placeholders; proj_names maps gate/up/down to the family's names.
    fused_gate_up / fused_down: one [E, 2I, H] / [E, H, I] tensor per layer (in-memory layout).
    """

    per_expert: tuple[str, ...]
    proj_names: dict[str, str]
    fused_gate_up: tuple[str, ...]
    fused_down: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """One architecture: how to read its config and where its tensors are."""

    name: str
    model_types: tuple[str, ...]
    spec_from_config: Callable[[dict], ModelSpec]
    backbone_keys: dict[str, tuple[str, ...]]  # canonical name (with {l}) -> candidate key templates
    expert_keys: ExpertKeys
    hf_architecture: str

    is_encoder_decoder = False  # decoder-only: the moeplex runtime runs it
    expert_parts = ("gate_up", "down")  # the tensors of one routed expert, as read_expert returns them

    def backbone_names(self, spec: ModelSpec) -> list[str]:
        """Canonical names of every backbone tensor this spec has, layer placeholders filled in."""
        names = [n for n in GLOBAL_TENSORS if not (n == "lm_head" and spec.tie_word_embeddings)]
        for layer in range(spec.num_layers):
            names += [f"layers.{layer}.{n}" for n in layer_backbone_names(spec, layer)]
        return names

    def backbone_key(self, reader: CheckpointReader, name: str) -> str:
        """The checkpoint key holding canonical tensor `name` (first candidate present)."""
        template_name, layer = _split_layer(name)
        candidates = [t.format(l=layer) for t in self.backbone_keys[template_name]]
        for key in candidates:
            if reader.has(key):
                return key
        raise CheckpointError(
            f"{reader.folder}: tensor '{candidates[0]}' ({self.name} {name}) is not in the checkpoint"
        )

    def backbone_shape(self, spec: ModelSpec, name: str) -> tuple[int, ...]:
        """The shape canonical backbone tensor `name` must have under this spec."""
        return expected_backbone_shape(spec, name)

    def saved_backbone_key(self, name: str) -> str:
        """The key transformers saves canonical backbone tensor `name` under (the first candidate template)."""
        template_name, layer = _split_layer(name)
        return self.backbone_keys[template_name][0].format(l=layer)

    def saved_expert_tensors(
        self, spec: ModelSpec, layer: int, expert: int, weights: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One routed expert under the per-expert keys transformers saves (own storage each, as safetensors needs)."""
        keys = self.expert_keys
        gate, up = weights["gate_up"].chunk(2, dim=0)
        return {
            keys.per_expert[0].format(l=layer, e=expert, proj=keys.proj_names[proj]): tensor.clone()
            for proj, tensor in (("gate", gate), ("up", up), ("down", weights["down"]))
        }

    def expert_output(self, spec: ModelSpec, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The expert applied to inputs x [n, H], in fp32: down(silu(gate x) * up x)."""
        return swiglu_mlp(x.float(), weights["gate_up"].float(), weights["down"].float())

    def expert_layout(self, reader: CheckpointReader, layer: int) -> str:
        """'fused' or 'per_expert', by which keys the checkpoint has for this layer."""
        if any(reader.has(t.format(l=layer)) for t in self.expert_keys.fused_gate_up):
            return "fused"
        return "per_expert"

    def read_expert(self, reader: CheckpointReader, spec: ModelSpec, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One routed expert as {"gate_up": [2I, H], "down": [H, I]}, read lazily from disk."""
        keys = self.expert_keys
        if self.expert_layout(reader, layer) == "fused":
            gate_up_key = _first_present(reader, keys.fused_gate_up, layer)
            down_key = _first_present(reader, keys.fused_down, layer)
            gate_up, down = reader.get_row(gate_up_key, expert), reader.get_row(down_key, expert)
            check_shape(reader, gate_up_key, gate_up, (2 * spec.expert_intermediate_size, spec.hidden_size))
        else:
            parts = {}
            for proj in ("gate", "up", "down"):
                key = self._per_expert_key(reader, layer, expert, proj)
                parts[proj] = reader.get(key)
                expected = (
                    (spec.hidden_size, spec.expert_intermediate_size)
                    if proj == "down"
                    else (spec.expert_intermediate_size, spec.hidden_size)
                )
                check_shape(reader, key, parts[proj], expected)
            gate_up, down = torch.cat([parts["gate"], parts["up"]], dim=0), parts["down"]
            down_key = self._per_expert_key(reader, layer, expert, "down")
        check_shape(reader, down_key, down, (spec.hidden_size, spec.expert_intermediate_size))
        return {"gate_up": gate_up, "down": down}

    def _per_expert_key(self, reader: CheckpointReader, layer: int, expert: int, proj: str) -> str:
        name = self.expert_keys.proj_names[proj]
        candidates = [t.format(l=layer, e=expert, proj=name) for t in self.expert_keys.per_expert]
        for key in candidates:
            if reader.has(key):
                return key
        raise CheckpointError(f"{reader.folder}: expert tensor '{candidates[0]}' is not in the checkpoint")


def layer_backbone_names(spec: ModelSpec, layer: int) -> list[str]:
    """Canonical per-layer backbone tensor names (without the 'layers.{l}.' prefix)."""
    names = ["attn_norm", "q", "k", "v", "o", "mlp_norm"]
    if spec.attention_bias:
        names += ["q_bias", "k_bias", "v_bias"]
    if spec.output_bias:
        names.append("o_bias")
    if spec.qk_norm:
        names += ["q_norm", "k_norm"]
    if spec.sparse_layers[layer]:
        names.append("router")
        if spec.shared_expert_intermediate_size:
            names += ["shared.gate", "shared.up", "shared.down"]
            if spec.shared_expert_gated:
                names.append("shared_gate")
    else:
        names += ["dense.gate", "dense.up", "dense.down"]
    return names


def expected_backbone_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """The shape a canonical backbone tensor must have under this spec."""
    base, _ = _split_layer(name)
    h, q, kv = spec.hidden_size, spec.q_size, spec.kv_size
    shared, dense = spec.shared_expert_intermediate_size, spec.dense_intermediate_size
    qk_norm = {"head": spec.head_dim, "full": None}.get(spec.qk_norm or "", None)
    shapes = {
        "embed": (spec.vocab_size, h),
        "lm_head": (spec.vocab_size, h),
        "final_norm": (h,),
        "layers.{l}.attn_norm": (h,),
        "layers.{l}.mlp_norm": (h,),
        "layers.{l}.q": (q, h),
        "layers.{l}.k": (kv, h),
        "layers.{l}.v": (kv, h),
        "layers.{l}.o": (h, q),
        "layers.{l}.q_bias": (q,),
        "layers.{l}.k_bias": (kv,),
        "layers.{l}.v_bias": (kv,),
        "layers.{l}.o_bias": (h,),
        "layers.{l}.q_norm": (qk_norm or q,),
        "layers.{l}.k_norm": (qk_norm or kv,),
        "layers.{l}.router": (spec.num_experts, h),
        "layers.{l}.shared.gate": (shared, h),
        "layers.{l}.shared.up": (shared, h),
        "layers.{l}.shared.down": (h, shared),
        "layers.{l}.shared_gate": (1, h),
        "layers.{l}.dense.gate": (dense, h),
        "layers.{l}.dense.up": (dense, h),
        "layers.{l}.dense.down": (h, dense),
    }
    return shapes[base]


def read_backbone_tensor(family: Family, reader: CheckpointReader, spec: ModelSpec, name: str) -> torch.Tensor:
    """Read one canonical backbone tensor and check its shape against the spec."""
    key = family.backbone_key(reader, name)
    tensor = reader.get(key)
    check_shape(reader, key, tensor, family.backbone_shape(spec, name))
    return tensor


def require_runtime(family: Family) -> None:
    """The moeplex runtime runs decoder-only families; an encoder-decoder one is a clear error."""
    if family.is_encoder_decoder:
        raise UnsupportedModelError(
            f"{family.name} is an encoder-decoder model: moeplex consolidates, stores and exports it, but its "
            "runtime serves decoder-only models; run the exported checkpoint with transformers"
        )


def common_spec_fields(config: dict, family: str) -> dict:
    """ModelSpec fields that every Llama-style family reads the same way from its config."""
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise UnsupportedModelError(f"{family}: hidden_act '{activation}' is not supported (only 'silu')")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    theta, scaling = _rope_settings(config)
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    window = config.get("sliding_window")
    if not config.get("use_sliding_window", True):
        window = None
    return dict(
        family=family,
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        sliding_window=window or None,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def sparse_layer_pattern(config: dict) -> tuple[bool, ...]:
    """Which layers route to experts, from Qwen-style decoder_sparse_step / mlp_only_layers."""
    step = config.get("decoder_sparse_step", 1) or 1
    dense_only = set(config.get("mlp_only_layers") or [])
    return tuple(
        (layer not in dense_only) and (layer + 1) % step == 0 for layer in range(config["num_hidden_layers"])
    )


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    params = config.get("rope_parameters") or {}
    legacy_scaling = config.get("rope_scaling")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else legacy_scaling
    return float(theta), scaling


def _split_layer(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    if parts[0] == "layers":
        return "layers.{l}." + ".".join(parts[2:]), int(parts[1])
    return name, None


def _first_present(reader: CheckpointReader, templates: tuple[str, ...], layer: int) -> str:
    for template in templates:
        if reader.has(template.format(l=layer)):
            return template.format(l=layer)
    raise CheckpointError(f"{reader.folder}: '{templates[0].format(l=layer)}' is not in the checkpoint")


def check_shape(reader: CheckpointReader, key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(
            f"{reader.file_of(key)}: tensor '{key}' has shape {tuple(tensor.shape)}, config implies {tuple(expected)}"
        )
