"""Where an offloaded expert's weights come from (the disk tier): a store's expert files or a checkpoint."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moeplex.checkpoint import CheckpointReader
from moeplex.errors import ExpertReadError
from moeplex.families.base import Family
from moeplex.model.spec import ModelSpec
from moeplex.offload.disk import read_safetensors_uncached
from moeplex.store.manifest import Manifest


@dataclass
class ExpertWeights:
    """One routed expert, compute-ready."""

    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down))

    def to(self, device, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(self.gate_up.to(device, dtype), self.down.to(device, dtype))


class ExpertSource(Protocol):
    dtype: torch.dtype  # of the weights it gives

    def expert_nbytes(self, key: Hashable) -> int:
        """Bytes of the expert once resident (in the compute dtype)."""
        ...

    def read(self, key: Hashable) -> tuple[ExpertWeights, int]:
        """(weights on CPU in the compute dtype, bytes read from disk); ExpertReadError naming the file."""
        ...


def _shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    inter, hidden = spec.expert_intermediate_size, spec.hidden_size
    return {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}


class StoreExpertSource:
    """Experts by store id, each read from its own file past the page cache.

    Reads check the file's size against the manifest and the tensors' names, shapes and dtypes
    against the spec; the sha256 of every blob is what `moeplex verify` checks (hashing each fetch
    would cost more CPU than the matmuls it feeds).
    """

    def __init__(self, root: Path, manifest: Manifest, spec: ModelSpec, dtype: torch.dtype):
        self.root, self.manifest, self.dtype = Path(root), manifest, dtype
        self.shapes = _shapes(spec)
        self._nbytes = spec.expert_numel * dtype.itemsize

    def expert_nbytes(self, key: str) -> int:
        return self._nbytes

    def read(self, key: str) -> tuple[ExpertWeights, int]:
        entry = self.manifest.experts.get(key)
        if entry is None:
            raise ExpertReadError(f"expert {key} is not in the manifest of {self.root}")
        path = self.root / entry.file
        try:
            tensors, nbytes = read_safetensors_uncached(path)
            if nbytes != entry.bytes:
                raise ValueError(f"{nbytes} bytes, the manifest says {entry.bytes}")
        except (OSError, ValueError) as exc:
            raise ExpertReadError(f"expert {key}: cannot read {path} ({exc})") from exc
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        if found != self.shapes:
            raise ExpertReadError(f"expert {key}: {path} holds {found}, expected {self.shapes}")
        weights = ExpertWeights(tensors["gate_up"], tensors["down"])
        return weights.to("cpu", self.dtype), nbytes


class CheckpointExpertSource:
    """Experts by (layer, expert index) from a Hugging Face checkpoint, through its memory map.

    The page cache is not bypassed here (experts share files with the backbone); cold-cache
    measurements read from a store.
    """

    def __init__(self, family: Family, reader: CheckpointReader, spec: ModelSpec, dtype: torch.dtype):
        self.family, self.reader, self.spec, self.dtype = family, reader, spec, dtype
        self._nbytes = self.spec.expert_numel * dtype.itemsize

    def expert_nbytes(self, key: tuple[int, int]) -> int:
        return self._nbytes

    def read(self, key: tuple[int, int]) -> tuple[ExpertWeights, int]:
        layer, expert = key
        try:
            tensors = self.family.read_expert(self.reader, self.spec, layer, expert)
        except Exception as exc:  # safetensors and mmap raise their own error types
            raise ExpertReadError(f"expert {layer}/{expert}: cannot read it from {self.reader.folder} ({exc})") from exc
        weights = ExpertWeights(tensors["gate_up"].to(self.dtype, copy=True), tensors["down"].to(self.dtype, copy=True))
        return weights, weights.nbytes
