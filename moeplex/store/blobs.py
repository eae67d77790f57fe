"""Store files checked against their manifest entries (size, sha256); every problem names the file."""

from __future__ import annotations

from pathlib import Path

from moeplex.store.checksums import sha256_bytes, sha256_file
from moeplex.store.errors import StoreError
from moeplex.store.manifest import BlobEntry


def blob_problem(root: Path, what: str, entry: BlobEntry, listed_in: str = "the manifest") -> str | None:
    """Why the file behind `entry` is not what its listing says (missing, wrong size, bad checksum), or None."""
    path = root / entry.file
    if not path.is_file():
        return f"{what}: file {path} is missing"
    return _size_problem(what, path, entry, path.stat().st_size, listed_in) or _checksum_problem(
        what, path, entry, sha256_file(path), listed_in
    )


def check_blob(root: Path, what: str, entry: BlobEntry) -> Path:
    """The blob's path, after checking it; StoreError naming the blob otherwise."""
    problem = blob_problem(root, what, entry)
    if problem:
        raise StoreError(problem)
    return root / entry.file


def read_checked(root: Path, what: str, entry: BlobEntry, listed_in: str = "the manifest") -> bytes:
    """The blob's bytes, read once and checked against its size and sha256; StoreError otherwise."""
    path = root / entry.file
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise StoreError(f"{what}: file {path} is missing") from exc
    problem = _size_problem(what, path, entry, len(data), listed_in) or _checksum_problem(
        what, path, entry, sha256_bytes(data), listed_in
    )
    if problem:
        raise StoreError(problem)
    return data


def _size_problem(what: str, path: Path, entry: BlobEntry, size: int, listed_in: str) -> str | None:
    if size != entry.bytes:
        return f"{what}: file {path} has {size} bytes, {listed_in} says {entry.bytes} (truncated or replaced)"
    return None


def _checksum_problem(what: str, path: Path, entry: BlobEntry, digest: str, listed_in: str) -> str | None:
    if digest != entry.sha256:
        return f"{what}: file {path} is corrupt (sha256 {digest[:12]}..., {listed_in} says {entry.sha256[:12]}...)"
    return None
