"""Saving a command's results: indented JSON at the path its --json option names."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path | None, result: dict) -> None:
    """Write result as indented JSON to path (parents created) and say so; nothing when path is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
