"""sha256 of blobs and files, and cheap fingerprints of source checkpoints (config + safetensors headers)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

CHUNK = 1 << 22


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in chunks so a large backbone never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_fingerprint(folder: Path) -> str:
    """sha256 over config.json, the shard index (if any), and each safetensors file's name, size and header.

    Reads kilobytes, not the weights: a re-saved or edited checkpoint changes a size or a header (names,
    dtypes, shapes, offsets); an in-place edit of tensor values that keeps all of those does not.
    """
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        digest.update(f"{shard.name}\0{shard.stat().st_size}\0".encode() + safetensors_header(shard))
    return digest.hexdigest()


def safetensors_bytes(folder: Path) -> int:
    """Bytes of a checkpoint's weights: the sizes of its safetensors files."""
    return sum(shard.stat().st_size for shard in folder.glob("*.safetensors"))


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (an 8-byte little-endian length, then the JSON)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return prefix
        return handle.read(struct.unpack("<Q", prefix)[0])
