"""The stores each system serves (the demo family's consolidated store, one identity store per variant, built once) and the memory budget."""

from __future__ import annotations

from pathlib import Path

from moeplex.consolidate.family_spec import FamilySpec
from moeplex.store import StoreReader
from moeplex.store.writer import identity_store

MIB = 2**20


def single_variant_stores(checkpoints: dict[str, Path], root: Path) -> dict[str, Path]:
    """One store per variant holding only that variant (what a static partition or one model serves)."""
    return {name: identity_store(FamilySpec(f"single-{name}", base=None, variants={name: folder}), root / f"single-store-{name}", progress=False) for name, folder in checkpoints.items()}


DTYPE_BYTES = {"bf16": 2, "fp32": 4}


def expert_bytes(store: Path, dtype: str) -> int:
    """Bytes of the store's distinct experts when served in dtype (what holding them all ready for compute takes)."""
    reader = StoreReader(store)
    ids = {expert_id for variant in reader.variants for row in reader.expert_table(variant) if row for expert_id in row}
    return len(ids) * reader.spec(reader.variants[0]).expert_numel * DTYPE_BYTES[dtype]
