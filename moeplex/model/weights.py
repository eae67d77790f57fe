"""Backbone weights (everything but routed experts) and loading a model from a checkpoint folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moeplex.checkpoint import CheckpointReader
from moeplex.families import family_for_config
from moeplex.families.base import Family, read_backbone_tensor, require_runtime
from moeplex.model.attention import AttentionWeights
from moeplex.model.experts import DenseExperts
from moeplex.model.spec import ModelSpec


@dataclass
class MLPWeights:
    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    attention: AttentionWeights
    router: torch.Tensor | None = None  # [E, H]; None in dense layers
    shared_expert: MLPWeights | None = None
    shared_expert_gate: torch.Tensor | None = None  # [1, H]
    dense_mlp: MLPWeights | None = None


@dataclass
class Backbone:
    """One variant's non-expert weights."""

    embed: torch.Tensor  # [V, H]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [V, H]; the embedding itself when tied
    layers: list[LayerWeights]

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for tensor in (getattr(owner, field) for _, (owner,), field in tensor_fields([self])):
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        return total


def load_backbone(
    family: Family, reader: CheckpointReader, spec: ModelSpec, dtype: torch.dtype, device="cpu"
) -> Backbone:
    """Read and assemble every backbone tensor, cast to dtype on device."""
    require_runtime(family)

    def get(name: str) -> torch.Tensor:
        # A copy of our own: tensors read from a file may start at any byte, and on some CPUs (AVX2 MKL) a matmul's
        # rounding depends on its operands' alignment, which would make logits depend on the checkpoint's layout.
        return read_backbone_tensor(family, reader, spec, name).to(device=device, dtype=dtype, copy=True)

    def maybe(name: str, present: bool) -> torch.Tensor | None:
        return get(name) if present else None

    def mlp(prefix: str) -> MLPWeights:
        return MLPWeights(torch.cat([get(f"{prefix}.gate"), get(f"{prefix}.up")]), get(f"{prefix}.down"))

    layers = []
    for layer in range(spec.num_layers):
        p = f"layers.{layer}"
        bias = spec.attention_bias
        attention = AttentionWeights(
            qkv=torch.cat([get(f"{p}.q"), get(f"{p}.k"), get(f"{p}.v")]),
            o=get(f"{p}.o"),
            qkv_bias=torch.cat([get(f"{p}.q_bias"), get(f"{p}.k_bias"), get(f"{p}.v_bias")]) if bias else None,
            o_bias=maybe(f"{p}.o_bias", spec.output_bias),
            q_norm=maybe(f"{p}.q_norm", spec.qk_norm is not None),
            k_norm=maybe(f"{p}.k_norm", spec.qk_norm is not None),
        )
        sparse = spec.sparse_layers[layer]
        shared = sparse and spec.shared_expert_intermediate_size > 0
        layers.append(
            LayerWeights(
                attn_norm=get(f"{p}.attn_norm"),
                mlp_norm=get(f"{p}.mlp_norm"),
                attention=attention,
                router=maybe(f"{p}.router", sparse),
                shared_expert=mlp(f"{p}.shared") if shared else None,
                shared_expert_gate=maybe(f"{p}.shared_gate", shared and spec.shared_expert_gated),
                dense_mlp=None if sparse else mlp(f"{p}.dense"),
            )
        )
    embed = get("embed")
    lm_head = embed if spec.tie_word_embeddings else get("lm_head")
    return Backbone(embed=embed, final_norm=get("final_norm"), lm_head=lm_head, layers=layers)


def load_dense_experts(
    family: Family, reader: CheckpointReader, spec: ModelSpec, dtype: torch.dtype, device="cpu", progress=False
) -> DenseExperts:
    """Every routed expert, resident, stacked per layer."""
    gate_up: list[torch.Tensor | None] = []
    down: list[torch.Tensor | None] = []
    total = sum(spec.sparse_layers) * spec.num_experts
    bar = tqdm(total=total, desc="experts", unit="expert", disable=not progress, leave=False)
    for layer in range(spec.num_layers):
        if not spec.sparse_layers[layer]:
            gate_up.append(None)
            down.append(None)
            continue
        shape_gu = (spec.num_experts, 2 * spec.expert_intermediate_size, spec.hidden_size)
        shape_d = (spec.num_experts, spec.hidden_size, spec.expert_intermediate_size)
        layer_gu = torch.empty(shape_gu, dtype=dtype, device=device)
        layer_d = torch.empty(shape_d, dtype=dtype, device=device)
        for expert in range(spec.num_experts):
            weights = family.read_expert(reader, spec, layer, expert)
            layer_gu[expert].copy_(weights["gate_up"])
            layer_d[expert].copy_(weights["down"])
            bar.update()
        gate_up.append(layer_gu)
        down.append(layer_d)
    bar.close()
    return DenseExperts(gate_up, down)


def open_checkpoint(folder: str | Path) -> tuple[Family, CheckpointReader, ModelSpec]:
    """Reader, family and spec of a checkpoint folder (reads only config and headers)."""
    reader = CheckpointReader(folder)
    family = family_for_config(reader.config)
    return family, reader, family.spec_from_config(reader.config)


def tensor_fields(objects: list, path: str = "") -> Iterator[tuple[str, list, str]]:
    """(path such as 'layers.3.attention.qkv', the objects holding it, field name) of every tensor field of
    parallel trees of backbone dataclasses (one tree per variant, same architecture); owners may be reassigned as it goes."""
    for field in dataclasses.fields(objects[0]):
        values, name = [getattr(o, field.name) for o in objects], f"{path}{field.name}"
        if isinstance(values[0], torch.Tensor):
            yield name, objects, field.name
        elif dataclasses.is_dataclass(values[0]):
            yield from tensor_fields(values, f"{name}.")
        elif isinstance(values[0], list):
            for index in range(len(values[0])):
                yield from tensor_fields([v[index] for v in values], f"{name}.{index}.")
