"""Request-level expert activation tracing: a layers x experts count matrix per request, and a bounded library."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import safetensors.torch
import torch

from moeplex.errors import MoeplexError
from moeplex.store.atomic import replace_file

TRACES_FOLDER = "traces"  # inside a store
MATRICES_FILE = "traces.safetensors"
INDEX_FILE = "traces.json"
TRACE_SCHEMA = 1


class TraceLibrary:
    """The activation matrices [L, E] of finished requests, each tagged with its variant; the oldest leave first."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int = 512):
        if capacity < 1:
            raise ValueError("a trace library holds at least one trace")
        self.num_layers, self.num_experts, self.capacity = num_layers, num_experts, capacity
        self._entries: deque[tuple[str, torch.Tensor]] = deque(maxlen=capacity)
        self._stacked: dict[str | None, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, variant: str, matrix: torch.Tensor) -> None:
        if tuple(matrix.shape) != (self.num_layers, self.num_experts):
            raise ValueError(f"trace shape {tuple(matrix.shape)} != ({self.num_layers}, {self.num_experts})")
        self._entries.append((variant, matrix.detach().to("cpu", torch.float32).clone()))
        self._stacked.clear()

    def matrices(self, variant: str | None = None) -> torch.Tensor:
        """[N, L, E] traces of the variant (all traces if it has none, or if variant is None)."""
        if variant not in self._stacked:
            chosen = [m for v, m in self._entries if v == variant] or [m for _, m in self._entries]
            empty = torch.zeros(0, self.num_layers, self.num_experts)
            self._stacked[variant] = torch.stack(chosen) if chosen else empty
        return self._stacked[variant]

    def save(self, folder: str | Path) -> None:
        """traces.safetensors ([N, L, E] float32) and traces.json (variant of each row, shape, capacity)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index = {
            "schema": TRACE_SCHEMA, "num_layers": self.num_layers, "num_experts": self.num_experts,
            "capacity": self.capacity, "variants": [v for v, _ in self._entries],
        }
        stacked = torch.stack([m for _, m in self._entries]) if self._entries else torch.zeros(0, self.num_layers, self.num_experts)
        replace_file(folder / MATRICES_FILE, safetensors.torch.save({"matrices": stacked.contiguous()}))
        replace_file(folder / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())

    @staticmethod
    def load(folder: str | Path, capacity: int | None = None) -> TraceLibrary:
        """A library saved by `save`; its newest `capacity` traces when given."""
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            matrices = safetensors.torch.load_file(str(folder / MATRICES_FILE))["matrices"]
        except (OSError, ValueError, KeyError, safetensors.SafetensorError) as exc:
            raise MoeplexError(f"{folder}: cannot read the trace library ({exc})") from exc
        if index.get("schema") != TRACE_SCHEMA or len(index["variants"]) != matrices.shape[0]:
            raise MoeplexError(f"{folder / INDEX_FILE}: schema or trace count does not match {MATRICES_FILE}")
        library = TraceLibrary(index["num_layers"], index["num_experts"], capacity or index["capacity"])
        for variant, matrix in zip(index["variants"], matrices):
            library.add(variant, matrix)
        return library


class ActivationTracer:
    """Counts the running request's expert choices per layer; hands the matrix to the library when it ends.

    Besides the counts it keeps a recency-weighted copy (each earlier visit of a layer weighs `decay`
    times less), which predicts the request's next tokens better than its whole history: consecutive
    tokens tend to pick the same experts.
    """

    def __init__(self, library: TraceLibrary, decay: float = 0.3):
        self.library, self.decay = library, decay
        self.version = 0
        self.requests = 0  # requests begun so far
        self.begin(None)

    def begin(self, variant: str | None) -> None:
        self.variant = variant
        self.version += 1  # changes whenever the matrices do
        self.requests += 1
        self.records = 0  # layers recorded in this request
        self.matrix = torch.zeros(self.library.num_layers, self.library.num_experts)  # [L, E] counts so far
        self.recent = torch.zeros(self.library.num_layers, self.library.num_experts)  # [L, E] decayed counts

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """Count the router's choices expert_ids [T, k] at this layer."""
        counts = torch.bincount(expert_ids.flatten().cpu(), minlength=self.library.num_experts).float()
        self.matrix[layer] += counts
        self.recent[layer] = self.decay * self.recent[layer] + counts
        self.version += 1
        self.records += 1

    def end(self) -> None:
        if self.variant is not None and self.matrix.sum() > 0:
            self.library.add(self.variant, self.matrix)
        self.variant = None

