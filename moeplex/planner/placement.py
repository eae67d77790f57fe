"""The placement file in a store: the planner's choice of precision per expert id, which the engine loads.

Written atomically (temporary file, fsync, rename) as `<store>/placement.json`; see docs/store-format.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeplex.model.experts import DenseExperts
from moeplex.quant.apply import quantize_bank_experts
from moeplex.quant.experts import QuantizedExpert
from moeplex.quant.formats import GROUP_SIZES, PRECISIONS, UNQUANTIZED
from moeplex.quant.store_copies import COPY_SOURCE_DTYPE, QuantizedCopies
from moeplex.store.errors import StoreError
from moeplex.store.experts import BANK_LAYER, ExpertBank
from moeplex.store.json_files import read_json, write_json_atomically

PLACEMENT_FILE = "placement.json"
PLACEMENT_VERSION = 1


@dataclass
class Placement:
    """Per expert id of the store: its precision (every expert resident on the device tier)."""

    precision: dict[str, str]  # expert id -> bf16 | int8 | int4
    group_size: int  # int4 group size
    selection: str = "least-error-first"
    device_memory_bytes: int | None = None  # the budget it was planned for
    configuration: dict[str, int] = field(default_factory=dict)  # {"int4": n, "int8": n, "bf16": n}
    measured: dict[str, float] = field(default_factory=dict)  # tokens_per_s, ppl, reference_ppl, resident_bytes
    version: int = PLACEMENT_VERSION

    def quantized(self) -> dict[str, str]:
        """Only the expert ids held below the model's own precision."""
        return {expert_id: p for expert_id, p in self.precision.items() if p != UNQUANTIZED}


def placement_path(store: str | Path) -> Path:
    return Path(store) / PLACEMENT_FILE


def write_placement(store: str | Path, placement: Placement) -> Path:
    """Replace the store's placement file in one step (temporary file, fsync, rename)."""
    return write_json_atomically(placement_path(store), asdict(placement))


def read_placement(store: str | Path) -> Placement | None:
    """The store's placement, or None when it has none; StoreError naming the file when it is unreadable."""
    path = placement_path(store)
    if not path.is_file():
        return None
    data = read_json(path, "delete it or run `moeplex plan` again")
    if not isinstance(data, dict) or data.get("version") != PLACEMENT_VERSION:
        raise StoreError(f"{path}: not a placement file of version {PLACEMENT_VERSION}; run `moeplex plan` again")
    try:
        placement = Placement(**data)
    except TypeError as exc:
        raise StoreError(f"{path}: malformed placement ({exc})") from exc
    _check(placement, path)
    return placement


def read_placement_for(store: str | Path, expert_ids: Iterable[str]) -> Placement | None:
    """The store's placement (None when it has none), checked to name only the given expert ids (those the variants use)."""
    placement = read_placement(store)
    if placement is None:
        return None
    unknown = sorted(set(placement.precision) - set(expert_ids))
    if unknown:
        raise StoreError(f"{placement_path(store)}: names expert ids this store's variants do not use: {unknown[:3]}")
    return placement


def apply_placement(store: str | Path, bank: ExpertBank) -> Placement | None:
    """Quantize the bank's experts as the store's placement says (nothing when it has none); returns the placement.

    Experts that the store has quantized copies of (`moeplex.quant.store_copies`) are read from them; the
    others are quantized from the bank's weights. Both give the same bits (copies are made from bf16
    weights, so a bank in another dtype quantizes all of its own).
    """
    placement = read_placement_for(store, bank.row_of)
    if placement is None:
        return None
    quantized = placement.quantized()
    stored = _stored_copies(store, bank, quantized, placement.group_size)
    quantize_bank_experts(bank, quantized, placement.group_size, stored)
    return placement


def _stored_copies(
    store: str | Path, bank: ExpertBank, precision_of_id: dict[str, str], group_size: int
) -> dict[str, QuantizedExpert]:
    """The store's copies of those experts, on the bank's device; none unless the bank holds bf16 DenseExperts."""
    if not isinstance(bank.compute, DenseExperts):
        return {}  # quantize_bank_experts says why it cannot quantize this bank
    stack = bank.compute.gate_up[BANK_LAYER]
    if stack.dtype != COPY_SOURCE_DTYPE:
        return {}
    return QuantizedCopies.load(store).read_many(precision_of_id, group_size, stack.device)


def _check(placement: Placement, path: Path) -> None:
    if not isinstance(placement.precision, dict) or not all(
        isinstance(i, str) and p in PRECISIONS for i, p in placement.precision.items()
    ):
        raise StoreError(f"{path}: 'precision' must map expert ids to one of {', '.join(PRECISIONS)}")
    if placement.group_size not in GROUP_SIZES:
        raise StoreError(f"{path}: group_size must be one of {GROUP_SIZES}, not {placement.group_size!r}")
