"""The index of a store's quantized expert copies (`quantized/index.json`): format names, reading, writing.

The copies sit beside the manifest, not in it (docs/store-format.md), so a store with them stays readable
by code that ignores them. The tensors inside a copy are `moeplex.quant.store_copies`' business.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from moeplex.quant.formats import GROUP_SIZES
from moeplex.store.json_files import read_json, write_json_atomically
from moeplex.store.errors import StoreError
from moeplex.store.layout import QUANTIZED_INDEX, quantized_file
from moeplex.store.manifest import BlobEntry

COPY_INDEX_VERSION = 1
COPY_FORMATS = ("int8", *(f"int4-g{group_size}" for group_size in GROUP_SIZES))

CopyIndex = dict[str, dict[str, BlobEntry]]  # copy format -> expert id -> the copy's file


def copy_format(precision: str, group_size: int) -> str:
    """The name of a copy's format: `int8`, or `int4-g<group_size>` (int8 has no groups; group_size is ignored)."""
    if precision == "int8":
        return "int8"
    if precision == "int4":
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, not {group_size}")
        return f"int4-g{group_size}"
    raise ValueError(f"no quantized copies in precision '{precision}' (copies are int8 or int4)")


def read_copy_index(root: str | Path) -> CopyIndex:
    """The store's copies ({} when it has no index); StoreError naming the index when it is malformed."""
    path = Path(root) / QUANTIZED_INDEX
    if not path.is_file():
        return {}
    data = read_json(path, "delete it and write the copies again")
    if not isinstance(data, dict) or data.get("version") != COPY_INDEX_VERSION:
        raise StoreError(f"{path}: not an index of quantized copies of version {COPY_INDEX_VERSION}")
    copies = data.get("copies")
    if not isinstance(copies, dict) or not all(isinstance(entries, dict) for entries in copies.values()):
        raise StoreError(f"{path}: 'copies' must map each format to {{expert id: blob entry}}")
    unknown = sorted(set(copies) - set(COPY_FORMATS))
    if unknown:
        raise StoreError(f"{path}: unknown copy formats {unknown} (known: {', '.join(COPY_FORMATS)})")
    return {
        fmt: {expert_id: _blob_entry(entry, fmt, expert_id, path) for expert_id, entry in entries.items()}
        for fmt, entries in copies.items()
    }


def write_copy_index(root: str | Path, index: CopyIndex) -> Path:
    """Replace the store's index in one step (temporary file, fsync, rename)."""
    copies = {fmt: {expert_id: asdict(entry) for expert_id, entry in entries.items()} for fmt, entries in index.items()}
    path = Path(root) / QUANTIZED_INDEX
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomically(path, {"version": COPY_INDEX_VERSION, "copies": copies})


def _blob_entry(entry, fmt: str, expert_id: str, path: Path) -> BlobEntry:
    where = f"{path}: copies.{fmt}.{expert_id}"
    well_formed = (
        isinstance(entry, dict)
        and set(entry) == {"file", "bytes", "sha256"}
        and isinstance(entry["bytes"], int)
        and isinstance(entry["sha256"], str)
    )
    if not well_formed:
        raise StoreError(f"{where} must be {{\"file\", \"bytes\", \"sha256\"}}")
    if entry["file"] != quantized_file(fmt, expert_id):
        raise StoreError(f"{where}: file is {entry['file']!r}, it must be {quantized_file(fmt, expert_id)!r}")
    return BlobEntry(**entry)
