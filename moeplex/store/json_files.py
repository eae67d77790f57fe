"""JSON files inside a store (manifest, placement, planner cache, copy index): read with errors naming the file, written in one step."""

from __future__ import annotations

import json
from pathlib import Path

from moeplex.store.atomic import replace_file
from moeplex.store.errors import StoreError


def read_json(path: Path, remedy: str):
    """The parsed file; StoreError naming it, with what to do (`remedy`), when it is truncated or not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: truncated or not valid JSON ({exc}); {remedy}") from exc


def write_json_atomically(path: Path, data) -> Path:
    """Indented, key-sorted JSON through `moeplex.store.atomic.replace_file`: a crash leaves the old file or the new one."""
    return replace_file(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
