"""Export one variant of a store as a plain Hugging Face checkpoint folder that transformers can load."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from moeplex.families.base import Family
from moeplex.model.spec import ModelSpec
from moeplex.store.atomic import staged_folder
from moeplex.store.blobs import read_checked
from moeplex.store.reader import StoreReader

WEIGHTS_FILE = "model.safetensors"


def export_variant(store: StoreReader | str | Path, variant: str, out: str | Path, overwrite: bool = False) -> Path:
    """Write config.json, model.safetensors (the key names transformers saves) and tokenizer files to `out`.

    The whole variant is assembled in memory, one copy of each tensor; `out` appears only when complete.
    """
    reader = store if isinstance(store, StoreReader) else StoreReader(store)
    family, spec = reader.family(variant), reader.spec(variant)
    tensors = _backbone_tensors(reader, variant, family, spec) | _expert_tensors(reader, variant, family)
    manifest = reader.manifest
    files = manifest.variant_files[variant] | manifest.tokenizer
    with staged_folder(Path(out), overwrite) as staging:
        safetensors.torch.save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        for name, entry in files.items():
            (staging / name).write_bytes(read_checked(reader.path, f"{name} of '{variant}'", entry))
    return Path(out)


def default_backbone_keys(family: Family, spec: ModelSpec) -> dict[str, str]:
    """Canonical backbone name -> the key transformers saves it under (the first candidate template)."""
    return {
        template.format(l=layer): candidates[0].format(l=layer)
        for template, candidates in family.backbone_keys.items()
        for layer in range(spec.num_layers)
    }


def default_expert_key(family: Family, layer: int, expert: int, proj: str) -> str:
    """Where transformers saves projection proj (gate, up, down) of one routed expert."""
    keys = family.expert_keys
    return keys.per_expert[0].format(l=layer, e=expert, proj=keys.proj_names[proj])


def _backbone_tensors(reader: StoreReader, variant: str, family: Family, spec: ModelSpec) -> dict[str, torch.Tensor]:
    backbone, keys = reader.open_backbone(variant), default_backbone_keys(family, spec)
    return {keys[name]: backbone.get(name) for name in family.backbone_names(spec)}


def _expert_tensors(reader: StoreReader, variant: str, family: Family) -> dict[str, torch.Tensor]:
    """Every routed expert split into per-expert gate/up/down tensors (own storage each, as safetensors needs)."""
    tensors = {}
    for layer, row in enumerate(reader.expert_table(variant)):
        for expert, expert_id in enumerate(row or []):
            weights = reader.read_expert(expert_id)
            gate, up = weights["gate_up"].chunk(2, dim=0)
            for proj, tensor in (("gate", gate), ("up", up), ("down", weights["down"])):
                tensors[default_expert_key(family, layer, expert, proj)] = tensor.clone()
    return tensors
