"""Where an offloaded expert's weights come from (the disk tier): a store's expert files or a checkpoint.

A store source can hand out each expert in the precision its placement gives it (bf16, int8, int4):
from the store's quantized copy when it has one, else quantized from the bf16 file as it is read.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moeplex.checkpoint import CheckpointReader
from moeplex.errors import ExpertReadError
from moeplex.families.base import Family
from moeplex.model.spec import ModelSpec
from moeplex.model.ops import swiglu_mlp
from moeplex.offload.disk import read_safetensors_uncached
from moeplex.quant.experts import QuantizedExpert, quantize_expert
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, UNQUANTIZED
from moeplex.quant.sizes import expert_nbytes
from moeplex.quant.store_copies import COPY_SOURCE_DTYPE, QuantizedCopies
from moeplex.store.manifest import Manifest


@dataclass
class ExpertWeights:
    """One routed expert in the model's dtype, compute-ready."""

    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, H] -> [n, H], on the weights' device."""
        return swiglu_mlp(x.to(self.gate_up.dtype), self.gate_up, self.down)

    @property
    def device(self) -> torch.device:
        return self.gate_up.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.gate_up, self.down))

    def to(self, device, dtype: torch.dtype | None = None) -> ExpertWeights:
        return ExpertWeights(self.gate_up.to(device, dtype), self.down.to(device, dtype))

    def pin_memory(self) -> ExpertWeights:
        return ExpertWeights(self.gate_up.pin_memory(), self.down.pin_memory())


PoolExpert = ExpertWeights | QuantizedExpert  # what a pool holds: callable on [n, H], with nbytes, device and to()


class ExpertSource(Protocol):
    dtype: torch.dtype  # the model's dtype (unquantized experts come in it)

    def expert_nbytes(self, key: Hashable) -> int:
        """Bytes of the expert once resident (in the precision the source gives it)."""
        ...

    def read(self, key: Hashable) -> tuple[PoolExpert, int]:
        """(the expert compute-ready on CPU, bytes read from disk); ExpertReadError naming the file."""
        ...


def _shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    inter, hidden = spec.expert_intermediate_size, spec.hidden_size
    return {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}


class StoreExpertSource:
    """Experts by store id, each read from its own file past the page cache, in its precision.

    precision_of: expert id -> bf16 | int8 | int4 (unlisted ids: bf16, the model's dtype). A quantized
    expert is read from the store's copy in that precision (`moeplex.quant.store_copies`) when there
    is one and the model is bf16 (copies are quantized from bf16), else from its file and quantized
    on the way in.

    Reads check the file's size against the manifest and the tensors' names, shapes and dtypes
    against the spec; the sha256 of every blob is what `moeplex verify` checks (hashing each fetch
    would cost more CPU than the matmuls it feeds).
    """

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        spec: ModelSpec,
        dtype: torch.dtype,
        precision_of: Mapping[str, str] | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        direct_io: bool = True,
    ):
        self.root, self.manifest, self.dtype = Path(root), manifest, dtype
        self.direct_io = direct_io  # False: read through the page cache and drop its pages (what reads cost before O_DIRECT)
        self.shapes = _shapes(spec)
        self.precision_of = {key: p for key, p in (precision_of or {}).items() if p != UNQUANTIZED}
        self.group_size = group_size
        self.copies = QuantizedCopies.load(self.root) if self.precision_of and dtype == COPY_SOURCE_DTYPE else None
        hidden, inter = spec.hidden_size, spec.expert_intermediate_size
        self._nbytes = {
            precision: expert_nbytes(hidden, inter, precision, group_size, dtype.itemsize)
            for precision in {UNQUANTIZED, *self.precision_of.values()}
        }

    def expert_nbytes(self, key: str) -> int:
        return self._nbytes[self.precision_of.get(key, UNQUANTIZED)]

    def read(self, key: str) -> tuple[PoolExpert, int]:
        precision = self.precision_of.get(key, UNQUANTIZED)
        if self.copies is not None and precision != UNQUANTIZED and self.copies.has(key, precision, self.group_size):
            return self.copies.read(key, precision, self.group_size, uncached=True)
        weights, nbytes = self._read_unquantized(key)
        if precision == UNQUANTIZED:
            return weights, nbytes
        return quantize_expert(weights.gate_up, weights.down, precision, self.group_size), nbytes

    def _read_unquantized(self, key: str) -> tuple[ExpertWeights, int]:
        entry = self.manifest.experts.get(key)
        if entry is None:
            raise ExpertReadError(f"expert {key} is not in the manifest of {self.root}")
        path = self.root / entry.file
        try:
            tensors, nbytes = read_safetensors_uncached(path, self.direct_io)
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
