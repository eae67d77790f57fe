"""Write a store: every plan group's expert once (content-addressed), each variant's backbone, a manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

from moeplex.consolidate.family_spec import BASE, VARIANT_NAME, FamilySpec, OpenCheckpoint, open_family
from moeplex.consolidate.plan import ConsolidationPlan, identity_plan
from moeplex.families.base import read_backbone_tensor
from moeplex.model.weights import open_checkpoint
from moeplex.store.aligned_safetensors import save_aligned
from moeplex.store.atomic import staged_folder
from moeplex.store.checksums import checkpoint_fingerprint, safetensors_bytes, sha256_bytes, sha256_file
from moeplex.store.errors import StoreError
from moeplex.store.layout import (
    EXPERTS,
    MANIFEST,
    TOKENIZER_FILES,
    VARIANT_FILES,
    backbone_file,
    expert_file,
    tokenizer_file,
    variant_file,
)
from moeplex.store.manifest import SCHEMA_VERSION, BlobEntry, ExpertTable, Manifest, SourceInfo, manifest_text
from moeplex.store.materialize import checkpoint_expert_reader, materialize_expert


def write_store(
    family: FamilySpec,
    plan: ConsolidationPlan,
    out: str | Path,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Materialize `plan` over the family's checkpoints into a store folder at `out`.

    dtype: cast every stored tensor to it (None keeps each source tensor's dtype). The store is built
    in a temporary sibling folder and renamed to `out` only when complete; `out` must not exist unless
    overwrite=True, which replaces it in one step.
    """
    out = Path(out)
    checkpoints = open_family(family)
    _check_plan(plan, checkpoints)
    with staged_folder(out, overwrite) as staging:
        experts, expert_id_of_group, expert_dtypes = _write_experts(staging, plan, checkpoints, dtype, progress)
        variants = list(plan.variants)
        backbones, backbone_dtypes = {}, set()
        for variant in variants:
            backbones[variant], dtypes = _write_backbone(staging, variant, checkpoints[variant], dtype)
            backbone_dtypes |= dtypes
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            family=family.name,
            architecture=checkpoints[variants[0]].family.name,
            hf_architecture=checkpoints[variants[0]].family.hf_architecture,
            variants=variants,
            sources=_describe_sources(plan, checkpoints),
            plan=plan.to_json(),
            expert_tables={v: _expert_table(plan, v, expert_id_of_group) for v in variants},
            experts=experts,
            backbones=backbones,
            variant_files={v: _copy_variant_files(staging, v, checkpoints[v].reader.folder) for v in variants},
            tokenizer=_copy_tokenizer(staging, checkpoints[variants[0]].reader.folder),
            dtypes={"experts": sorted(expert_dtypes), "backbones": sorted(backbone_dtypes)},
            bytes={},
            base=BASE if family.base is not None else None,
            own_domain={v: domain for v, domain in family.own_domain.items() if v in variants},
        )
        manifest.bytes = _byte_counts(manifest)
        (staging / MANIFEST).write_text(manifest_text(manifest))
    return out


def identity_store(family: FamilySpec, out: str | Path, progress: bool = True) -> Path:
    """The family's checkpoints as a store with no sharing (byte-identical experts once); written unless one is at `out`."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        spec = open_checkpoint(next(iter(family.checkpoints().values())))[2]
        sparse = tuple(layer for layer, is_sparse in enumerate(spec.sparse_layers) if is_sparse)
        write_store(family, identity_plan(tuple(family.checkpoints()), spec.num_layers, spec.num_experts, sparse), out, progress=progress)
    return out


def _check_plan(plan: ConsolidationPlan, checkpoints: dict[str, OpenCheckpoint]) -> None:
    """The plan covers this family's shape and names only its checkpoints."""
    if not plan.variants:
        raise StoreError(f"plan '{plan.method}' has no variants; a store holds at least one")
    try:
        plan.validate()
    except ValueError as exc:
        raise StoreError(f"invalid consolidation plan: {exc}") from exc
    unknown = [v for v in plan.variants if v not in checkpoints]
    unknown += [m[0] for g in plan.groups.values() for m in g.members if m[0] not in checkpoints]
    if unknown:
        raise StoreError(f"plan '{plan.method}' names checkpoints {sorted(set(unknown))} that the family does not have")
    bad_names = [v for v in plan.variants if not VARIANT_NAME.match(v)]
    if bad_names:
        raise StoreError(f"variant names {bad_names} must match {VARIANT_NAME.pattern} (they become file names)")
    spec = checkpoints[plan.variants[0]].spec
    sparse = tuple(layer for layer, is_sparse in enumerate(spec.sparse_layers) if is_sparse)
    expected = (spec.num_layers, spec.num_experts, sparse)
    if (plan.num_layers, plan.num_experts, tuple(plan.sparse_layers)) != expected:
        raise StoreError(
            f"plan '{plan.method}' is for (layers, experts, sparse layers) "
            f"{(plan.num_layers, plan.num_experts, tuple(plan.sparse_layers))}, the family has {expected}"
        )
    for name, group in plan.groups.items():
        for _, layer, expert in group.members:
            if layer not in sparse or not 0 <= expert < spec.num_experts:
                raise StoreError(f"plan group '{name}' names a position with no expert: layer {layer}, expert {expert}")


def _write_experts(
    staging: Path, plan: ConsolidationPlan, checkpoints: dict[str, OpenCheckpoint], dtype, progress: bool
) -> tuple[dict[str, BlobEntry], dict[str, str], set[str]]:
    """Write each used group's expert, once per distinct content: ({id: blob}, {group: id}, dtypes)."""
    groups_in_use = list(dict.fromkeys(plan.assignment[position] for position in plan.positions()))
    (staging / EXPERTS).mkdir()
    experts: dict[str, BlobEntry] = {}
    expert_id_of_group: dict[str, str] = {}
    dtypes: set[str] = set()
    read = checkpoint_expert_reader(checkpoints)
    for group in tqdm(groups_in_use, desc="experts", unit="expert", disable=not progress, leave=False):
        tensors = materialize_expert(plan.groups[group], read, dtype)
        data = save_aligned(tensors)
        expert_id = sha256_bytes(data)
        if expert_id not in experts:
            (staging / expert_file(expert_id)).write_bytes(data)
            experts[expert_id] = BlobEntry(expert_file(expert_id), len(data), expert_id)
            dtypes |= {_dtype_name(t.dtype) for t in tensors.values()}
        expert_id_of_group[group] = expert_id
    return experts, expert_id_of_group, dtypes


def _write_backbone(staging: Path, variant: str, checkpoint: OpenCheckpoint, dtype) -> tuple[BlobEntry, set[str]]:
    """All canonical backbone tensors of one variant in one safetensors file, canonical names as keys."""
    family, reader, spec = checkpoint.family, checkpoint.reader, checkpoint.spec
    tensors = {}
    for name in family.backbone_names(spec):
        tensor = read_backbone_tensor(family, reader, spec, name)
        tensors[name] = tensor.to(dtype or tensor.dtype).contiguous()
    relative = backbone_file(variant)
    (staging / relative).parent.mkdir(exist_ok=True)
    safetensors.torch.save_file(tensors, staging / relative)
    return _entry_of(staging, relative), {_dtype_name(t.dtype) for t in tensors.values()}


def _copy_variant_files(staging: Path, variant: str, folder: Path) -> dict[str, BlobEntry]:
    present = [name for name in VARIANT_FILES if (folder / name).is_file()]
    return {name: _copy(folder / name, staging, variant_file(variant, name)) for name in present}


def _copy_tokenizer(staging: Path, folder: Path) -> dict[str, BlobEntry]:
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return {name: _copy(folder / name, staging, tokenizer_file(name)) for name in present}


def _copy(source: Path, staging: Path, relative: str) -> BlobEntry:
    (staging / relative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, staging / relative)
    return _entry_of(staging, relative)


def _entry_of(staging: Path, relative: str) -> BlobEntry:
    path = staging / relative
    return BlobEntry(relative, path.stat().st_size, sha256_file(path))


def _expert_table(plan: ConsolidationPlan, variant: str, expert_id_of_group: dict[str, str]) -> ExpertTable:
    sparse = set(plan.sparse_layers)
    return [
        [expert_id_of_group[plan.assignment[(variant, layer, e)]] for e in range(plan.num_experts)]
        if layer in sparse
        else None
        for layer in range(plan.num_layers)
    ]


def _describe_sources(plan: ConsolidationPlan, checkpoints: dict[str, OpenCheckpoint]) -> dict[str, SourceInfo]:
    """The checkpoints the store reads: every variant and every checkpoint a group takes weights from."""
    used = dict.fromkeys([*plan.variants, *(m[0] for g in plan.groups.values() for m in g.members)])
    return {name: _source_info(checkpoints[name].reader.folder) for name in used}


def _source_info(folder: Path) -> SourceInfo:
    return SourceInfo(str(folder.resolve()), checkpoint_fingerprint(folder), safetensors_bytes(folder))


def _byte_counts(manifest: Manifest) -> dict[str, int]:
    """Store bytes (all files but the manifest) against the variants' original checkpoint bytes."""
    variant_sizes = [manifest.sources[v].bytes for v in manifest.variants]
    return {
        "experts": sum(entry.bytes for entry in manifest.experts.values()),
        "backbones": sum(entry.bytes for entry in manifest.backbones.values()),
        "store_total": sum(entry.bytes for _, entry in manifest.blobs()),
        "sources_total": sum(variant_sizes),
        "one_model": variant_sizes[0],
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
