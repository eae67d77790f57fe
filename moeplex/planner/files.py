"""Write a planner JSON file in one step: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
from pathlib import Path

from moeplex.store.atomic import replace_file


def write_json_atomically(path: Path, data) -> Path:
    """Indented, key-sorted JSON through `moeplex.store.atomic.replace_file`."""
    return replace_file(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
