"""Read a store: its manifest, each variant's spec, backbone and expert table, experts by id, whole models."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from tqdm import tqdm

from moeplex.families import family_for_config
from moeplex.families.base import Family, require_runtime
from moeplex.model.experts import DenseExperts
from moeplex.model.runtime import MoEModel
from moeplex.model.spec import ModelSpec
from moeplex.model.weights import Backbone, load_backbone
from moeplex.store.blobs import check_blob, read_checked
from moeplex.store.errors import StoreError
from moeplex.store.experts import ExpertBank, StoreExperts, bank_order
from moeplex.store.manifest import ExpertTable, read_manifest

class BackboneFile:
    """A CheckpointReader look-alike over one variant's backbone blob, whose keys are canonical names.

    With `canonical_family(family)` it lets `moeplex.model.weights.load_backbone` assemble a Backbone
    from the store exactly as it does from a Hugging Face checkpoint.
    """

    def __init__(self, path: Path):
        self.folder = path
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise StoreError(f"{path}: cannot open backbone file ({exc})") from exc
        self._keys = set(self._handle.keys())

    def keys(self) -> list[str]:
        return sorted(self._keys)

    def has(self, key: str) -> bool:
        return key in self._keys

    def file_of(self, key: str) -> Path:
        return self.folder

    def get(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise StoreError(f"{self.folder}: backbone tensor '{key}' is missing")
        return self._handle.get_tensor(key)


def canonical_family(family: Family) -> Family:
    """The family with each backbone name looked up under itself (the store's key names)."""
    return dataclasses.replace(family, backbone_keys={name: (name,) for name in family.backbone_keys})


class StoreReader:
    """A store opened for reading; nothing but the manifest is read until asked for.

    Every blob is checked against its manifest checksum when it is read, so a corrupt or missing file
    is a StoreError naming it, never wrong weights.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._configs: dict[str, dict] = {}

    @property
    def variants(self) -> list[str]:
        return list(self.manifest.variants)

    @property
    def base(self) -> str | None:
        """The name of the model the variants were fine-tuned from (served or not), if the family has one."""
        return self.manifest.base

    def config(self, variant: str) -> dict:
        """The variant's original Hugging Face config.json."""
        if variant not in self._configs:
            entry = self.manifest.variant_files[self._known(variant)]["config.json"]
            self._configs[variant] = json.loads(read_checked(self.path, f"config.json of '{variant}'", entry))
        return self._configs[variant]

    def family(self, variant: str) -> Family:
        return family_for_config(self.config(variant))

    def spec(self, variant: str) -> ModelSpec:
        return self.family(variant).spec_from_config(self.config(variant))

    def expert_table(self, variant: str) -> ExpertTable:
        """[layer][expert index] -> expert id; None for dense layers."""
        return self.manifest.expert_tables[self._known(variant)]

    def open_backbone(self, variant: str) -> BackboneFile:
        """The variant's backbone blob (checksum checked, then memory-mapped)."""
        entry = self.manifest.backbones[self._known(variant)]
        return BackboneFile(check_blob(self.path, f"backbone of '{variant}'", entry))

    def load_backbone(self, variant: str, dtype: torch.dtype, device="cpu") -> Backbone:
        require_runtime(self.family(variant))
        family = canonical_family(self.family(variant))
        return load_backbone(family, self.open_backbone(variant), self.spec(variant), dtype, device)

    def read_expert(self, expert_id: str) -> dict[str, torch.Tensor]:
        """One stored expert ({"gate_up": [2I, H], "down": [H, I]}, Switch: {"wi", "wo"}), read and checksummed now."""
        entry = self.manifest.experts.get(expert_id)
        if entry is None:
            raise StoreError(f"{self.path}: expert id {expert_id} is not in the store's manifest")
        what = f"expert {expert_id}"
        try:
            tensors = safetensors.torch.load(read_checked(self.path, what, entry))
        except safetensors.SafetensorError as exc:
            raise StoreError(f"{what}: {self.path / entry.file} is not a valid safetensors file ({exc})") from exc
        parts = self.family(self.manifest.variants[0]).expert_parts
        if set(tensors) != set(parts):
            raise StoreError(f"{what}: {self.path / entry.file} holds {sorted(tensors)}, expected {list(parts)}")
        return tensors

    def load_expert_bank(
        self, expert_ids: list[str], spec: ModelSpec, dtype: torch.dtype, device="cpu", progress=False
    ) -> ExpertBank:
        """The given experts resident on device, stacked into one bank (each id once)."""
        expert_ids = list(dict.fromkeys(expert_ids))
        hidden, inter = spec.hidden_size, spec.expert_intermediate_size
        shapes = {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}
        stacks = {
            part: torch.empty((len(expert_ids), *shape), dtype=dtype, device=device) for part, shape in shapes.items()
        }
        bar = tqdm(expert_ids, desc="experts", unit="expert", disable=not progress, leave=False)
        for row, expert_id in enumerate(bar):
            for part, tensor in self.read_expert(expert_id).items():
                if tuple(tensor.shape) != shapes[part]:
                    raise StoreError(
                        f"expert {expert_id}: '{part}' has shape {tuple(tensor.shape)}, the spec implies {shapes[part]}"
                    )
                stacks[part][row].copy_(tensor)
        return ExpertBank(expert_ids, DenseExperts([stacks["gate_up"]], [stacks["down"]]))

    def load_variant_models(
        self, variants: list[str], dtype: torch.dtype, device="cpu", progress=False
    ) -> dict[str, MoEModel]:
        """Models of several variants sharing one expert bank: each unique expert is resident once."""
        require_runtime(self.family(variants[0]))
        tables = {variant: self.expert_table(variant) for variant in variants}
        used = bank_order(list(tables.values()))
        bank = self.load_expert_bank(used, self.spec(variants[0]), dtype, device, progress)
        return {
            variant: MoEModel(
                self.spec(variant),
                self.load_backbone(variant, dtype, device),
                StoreExperts(bank, bank.rows(table, device)),
                dtype,
                device,
            )
            for variant, table in tables.items()
        }

    def load_variant_model(
        self, variant: str, dtype: torch.dtype = torch.bfloat16, device="cpu", progress=False
    ) -> MoEModel:
        """One variant as a resident MoEModel whose experts come from the store."""
        return self.load_variant_models([variant], dtype, device, progress)[variant]

    def _known(self, variant: str) -> str:
        if variant not in self.manifest.variants:
            raise StoreError(f"{self.path}: no variant '{variant}' (the store has {', '.join(self.manifest.variants)})")
        return variant
