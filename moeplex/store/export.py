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
    tensors = _backbone_tensors(reader, variant, family, spec) | _expert_tensors(reader, variant, family, spec)
    manifest = reader.manifest
    files = manifest.variant_files[variant] | manifest.tokenizer
    with staged_folder(Path(out), overwrite) as staging:
        safetensors.torch.save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        for name, entry in files.items():
            (staging / name).write_bytes(read_checked(reader.path, f"{name} of '{variant}'", entry))
    return Path(out)


def _backbone_tensors(reader: StoreReader, variant: str, family: Family, spec: ModelSpec) -> dict[str, torch.Tensor]:
    backbone = reader.open_backbone(variant)
    return {family.saved_backbone_key(name): backbone.get(name) for name in family.backbone_names(spec)}


def _expert_tensors(reader: StoreReader, variant: str, family: Family, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Every routed expert under the per-expert keys transformers saves."""
    tensors = {}
    for layer, row in enumerate(reader.expert_table(variant)):
        for expert, expert_id in enumerate(row or []):
            tensors |= family.saved_expert_tensors(spec, layer, expert, reader.read_expert(expert_id))
    return tensors
