"""Lazy, memory-mapped reading of Hugging Face checkpoint folders (config.json + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from moeplex.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
SINGLE_FILE = "model.safetensors"


class CheckpointReader:
    """Reads tensors one at a time from a checkpoint folder, sharded with an index or not.

    Nothing is read until a tensor is asked for; the files are memory-mapped, so a checkpoint
    larger than RAM can be inspected and its experts read one by one.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        self.config = read_config(self.folder)
        self._file_of_key = _map_keys_to_files(self.folder)
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self._file_of_key)

    def has(self, key: str) -> bool:
        return key in self._file_of_key

    def file_of(self, key: str) -> Path:
        if key not in self._file_of_key:
            raise CheckpointError(f"{self.folder}: tensor '{key}' is not in the checkpoint")
        return self.folder / self._file_of_key[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def nbytes(self, key: str) -> int:
        """Bytes the tensor takes on disk, read from the header only."""
        view = self._slice(key)
        numel = 1
        for size in view.get_shape():
            numel *= size
        return numel * DTYPE_BYTES[view.get_dtype()]

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, as stored."""
        return self._handle(key).get_tensor(key)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """One slice along the first dimension (one expert of a fused [E, ...] tensor)."""
        return self._slice(key)[index]

    def _slice(self, key: str):
        return self._handle(key).get_slice(key)

    def _handle(self, key: str):
        path = self.file_of(key)
        name = path.name
        if name not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{self.folder}: shard '{name}' (holding '{key}') is missing")
            try:
                self._handles[name] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{path}: cannot open safetensors file ({exc})") from exc
        return self._handles[name]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: config.json is missing; is this a Hugging Face checkpoint?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def _map_keys_to_files(folder: Path) -> dict[str, str]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: malformed index ({exc})") from exc
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder}: shard '{shard}' listed in {INDEX_FILE} is missing")
        return dict(weight_map)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (and no {INDEX_FILE})")
    mapping: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    mapping[key] = file.name
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read safetensors header ({exc})") from exc
    return mapping
