"""Check a store end to end: manifest schema, every blob's size and checksum, every expert reference, quantized copies."""

from __future__ import annotations

from pathlib import Path

from moeplex.store.blobs import blob_problem
from moeplex.store.copy_index import read_copy_index
from moeplex.store.errors import StoreError
from moeplex.store.layout import EXPERTS, QUANTIZED, QUANTIZED_INDEX, expert_file
from moeplex.store.manifest import Manifest, read_manifest


def verify_store(path: str | Path) -> list[str]:
    """Every problem found, one line each naming the file or table entry; [] for a sound store.

    Reads every blob in full (to check its sha256); never raises for a damaged store.
    """
    root = Path(path)
    try:
        manifest = read_manifest(root)
    except StoreError as exc:
        return [str(exc)]
    problems = [problem for what, entry in manifest.blobs() if (problem := blob_problem(root, what, entry))]
    problems += _misnamed_experts(manifest)
    problems += _table_problems(manifest)
    problems += _unreferenced_experts(manifest)
    problems += _unlisted_files(root, EXPERTS, {entry.file for entry in manifest.experts.values()}, "the manifest")
    problems += _quantized_copy_problems(root, manifest)
    return problems


def _misnamed_experts(manifest: Manifest) -> list[str]:
    """An expert's id is the sha256 of its blob and names its file."""
    return [
        f"expert {expert_id}: manifest entry has file {entry.file} and sha256 {entry.sha256}; both must match the id"
        for expert_id, entry in manifest.experts.items()
        if entry.sha256 != expert_id or entry.file != expert_file(expert_id)
    ]


def _table_problems(manifest: Manifest) -> list[str]:
    """Each variant's table has the plan's shape, and every id in it is a stored expert."""
    num_layers, num_experts = manifest.plan.get("num_layers"), manifest.plan.get("num_experts")
    sparse = set(manifest.plan.get("sparse_layers", []))
    problems = []
    for variant, table in manifest.expert_tables.items():
        where = f"expert table of '{variant}'"
        if len(table) != num_layers:
            problems.append(f"{where} has {len(table)} layers, the plan has {num_layers}")
        for layer, row in enumerate(table):
            at = f"{where} layer {layer}"
            if row is None:
                problems += [f"{at}: no row, but the plan routes this layer to experts"] if layer in sparse else []
                continue
            if layer not in sparse:
                problems.append(f"{at}: has a row, but the plan says the layer is dense")
            if len(row) != num_experts:
                problems.append(f"{at} has {len(row)} experts, the plan has {num_experts}")
            problems += [
                f"{at} expert {e}: id {expert_id} is not a stored expert"
                for e, expert_id in enumerate(row)
                if expert_id not in manifest.experts
            ]
    return problems


def _unreferenced_experts(manifest: Manifest) -> list[str]:
    unused = sorted(set(manifest.experts) - manifest.referenced_expert_ids())
    return [f"expert {expert_id}: stored but no variant's table uses it" for expert_id in unused]


def _quantized_copy_problems(root: Path, manifest: Manifest) -> list[str]:
    """The index of quantized copies parses; every copy it lists is intact and of a stored expert; nothing unlisted."""
    try:
        index = read_copy_index(root)
    except StoreError as exc:
        return [str(exc)]
    listed_in = QUANTIZED_INDEX
    copies = [
        (f"{fmt} copy of expert {expert_id}", expert_id, entry)
        for fmt, entries in index.items()
        for expert_id, entry in entries.items()
    ]
    problems = [problem for what, _, entry in copies if (problem := blob_problem(root, what, entry, listed_in))]
    problems += [
        f"{what}: {listed_in} lists it, but the manifest has no such expert"
        for what, expert_id, _ in copies
        if expert_id not in manifest.experts
    ]
    listed = {QUANTIZED_INDEX} | {entry.file for _, _, entry in copies}
    return problems + _unlisted_files(root, QUANTIZED, listed, listed_in)


def _unlisted_files(root: Path, folder: str, listed: set[str], listed_in: str) -> list[str]:
    """Files under `folder` that `listed_in` does not list (left over from a killed write, or put there by hand)."""
    present = {path.relative_to(root).as_posix() for path in (root / folder).rglob("*") if path.is_file()}
    return [f"{root / name}: file in the store that {listed_in} does not list" for name in sorted(present - listed)]
