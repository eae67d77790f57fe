"""Planner measurements kept in the store folder (`planner-cache.json`) and reused across runs.

Entries are grouped by measurement context (store manifest, settings, torch version): a run only reuses what
was measured under its own context. The file is rewritten atomically after every new measurement.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from moeplex.store.errors import StoreError
from moeplex.store.json_files import read_json, write_json_atomically

CACHE_FILE = "planner-cache.json"
CACHE_VERSION = 1


class MeasurementCache:
    """Calibration and per-configuration measurements of one store under one context."""

    def __init__(self, store: str | Path, context: dict):
        self.path = Path(store) / CACHE_FILE
        self.context_key = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        self.data = self._read()
        self.entry = self.data["contexts"].setdefault(self.context_key, {"context": context, "measurements": {}})

    @property
    def calibration(self) -> dict | None:
        return self.entry.get("calibration")

    def set_calibration(self, calibration: dict) -> None:
        self.entry["calibration"] = calibration
        self._save()

    def measurement(self, key: str) -> dict | None:
        """{"tokens_per_s": x, "ppl": y} measured for this configuration key, or None."""
        return self.entry["measurements"].get(key)

    def add_measurement(self, key: str, measured: dict) -> None:
        self.entry["measurements"][key] = measured
        self._save()

    def _read(self) -> dict:
        if not self.path.is_file():
            return {"version": CACHE_VERSION, "contexts": {}}
        data = read_json(self.path, "delete it to measure again")
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("contexts"), dict):
            raise StoreError(f"{self.path}: not a planner cache of version {CACHE_VERSION}; delete it to measure again")
        return data

    def _save(self) -> None:
        write_json_atomically(self.path, self.data)
