"""A family of checkpoints (base + fine-tuned variants) from a YAML file, checked to share one architecture."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from moeplex.checkpoint import CheckpointReader
from moeplex.errors import MoeplexError
from moeplex.families.base import Family
from moeplex.model.spec import ModelSpec
from moeplex.model.weights import open_checkpoint

BASE = "base"

# Variant names become file names inside a store and model names in API requests.
VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Spec fields that are free to differ between variants of one family; every other field must match.
FREE_SPEC_FIELDS = frozenset({"max_position_embeddings", "bos_token_id", "eos_token_ids"})


class FamilySpecError(MoeplexError):
    """A family YAML is malformed, names a missing checkpoint, or its checkpoints do not share one architecture."""


@dataclass(frozen=True)
class FamilySpec:
    """name; base: the model the variants were fine-tuned from (optional); variants: name -> checkpoint folder."""

    name: str
    base: Path | None
    variants: dict[str, Path]
    own_domain: dict[str, str] = field(default_factory=dict)  # variant -> the domain it was fine-tuned on

    def checkpoints(self) -> dict[str, Path]:
        """Every checkpoint of the family by name, the base (if any) as "base" first."""
        return ({BASE: self.base} if self.base is not None else {}) | dict(self.variants)


@dataclass(frozen=True)
class OpenCheckpoint:
    """One checkpoint of a family, opened lazily (config and safetensors headers only)."""

    name: str
    family: Family
    reader: CheckpointReader
    spec: ModelSpec  # a SwitchSpec for switch_transformers


def load_family_spec(yaml_path: str | Path) -> FamilySpec:
    """Read a family YAML ({name, base, variants: {name: folder}, own_domain}) and check its checkpoints.

    Folders are relative to the YAML file's folder. Raises FamilySpecError naming the variant and the
    field or tensor that is wrong.
    """
    yaml_path = Path(yaml_path)
    data = _read_yaml(yaml_path)
    root = yaml_path.parent
    family = FamilySpec(
        name=_require_str(data, "name", yaml_path),
        base=root / _require_str(data, BASE, yaml_path) if data.get(BASE) is not None else None,
        variants={name: root / folder for name, folder in _require_mapping(data, "variants", yaml_path).items()},
        own_domain=_require_mapping(data, "own_domain", yaml_path) if "own_domain" in data else {},
    )
    _check_names(family, yaml_path)
    open_family(family)
    return family


def open_family(family: FamilySpec) -> dict[str, OpenCheckpoint]:
    """Open every checkpoint of the family and check they share family, architecture and shapes."""
    opened = {name: _open(name, folder) for name, folder in family.checkpoints().items()}
    reference = next(iter(opened.values()))
    for checkpoint in opened.values():
        _check_same_architecture(reference, checkpoint)
        _check_backbone_shapes(checkpoint)
    return opened


def _open(name: str, folder: Path) -> OpenCheckpoint:
    if not folder.is_dir():
        raise FamilySpecError(f"variant '{name}': checkpoint folder not found: {folder}")
    try:
        family, reader, spec = open_checkpoint(folder)
    except MoeplexError as exc:
        raise FamilySpecError(f"variant '{name}': {exc}") from exc
    return OpenCheckpoint(name, family, reader, spec)


def _check_same_architecture(reference: OpenCheckpoint, checkpoint: OpenCheckpoint) -> None:
    if checkpoint.family.name != reference.family.name:
        raise FamilySpecError(
            f"variant '{checkpoint.name}' is a {checkpoint.family.name} model but '{reference.name}' is a "
            f"{reference.family.name} model; a family shares one architecture"
        )
    for spec_field in fields(reference.spec):
        if spec_field.name in FREE_SPEC_FIELDS:
            continue
        ours, theirs = getattr(checkpoint.spec, spec_field.name), getattr(reference.spec, spec_field.name)
        if ours != theirs:
            raise FamilySpecError(
                f"variant '{checkpoint.name}' ({checkpoint.reader.folder}) has {spec_field.name}={ours!r} but "
                f"'{reference.name}' has {spec_field.name}={theirs!r}; a family shares one architecture"
            )


def _check_backbone_shapes(checkpoint: OpenCheckpoint) -> None:
    """Every backbone tensor is present with the shape its config implies (reads headers only)."""
    family, reader, spec = checkpoint.family, checkpoint.reader, checkpoint.spec
    for name in family.backbone_names(spec):
        try:
            key = family.backbone_key(reader, name)
        except MoeplexError as exc:
            raise FamilySpecError(f"variant '{checkpoint.name}': {exc}") from exc
        shape, expected = reader.shape(key), family.backbone_shape(spec, name)
        if tuple(shape) != tuple(expected):
            raise FamilySpecError(
                f"variant '{checkpoint.name}': tensor '{key}' has shape {tuple(shape)}, "
                f"its config implies {tuple(expected)}"
            )


def _check_names(family: FamilySpec, yaml_path: Path) -> None:
    if not family.variants:
        raise FamilySpecError(f"{yaml_path}: 'variants' is empty; a family needs at least one variant")
    for name in family.variants:
        if not VARIANT_NAME.match(name):
            raise FamilySpecError(f"{yaml_path}: variant name '{name}' must match {VARIANT_NAME.pattern}")
    if family.base is not None and BASE in family.variants:
        raise FamilySpecError(f"{yaml_path}: a variant may not be called '{BASE}' when the family has a base")
    unknown = sorted(set(family.own_domain) - set(family.variants))
    if unknown:
        raise FamilySpecError(f"{yaml_path}: own_domain names unknown variants {unknown}")


def _read_yaml(yaml_path: Path) -> dict:
    if not yaml_path.is_file():
        raise FamilySpecError(f"family file not found: {yaml_path}")
    try:
        data = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as exc:
        raise FamilySpecError(f"{yaml_path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise FamilySpecError(f"{yaml_path}: expected a mapping with name, base, variants")
    return data


def _require_str(data: dict, key: str, yaml_path: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise FamilySpecError(f"{yaml_path}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _require_mapping(data: dict, key: str, yaml_path: Path) -> dict[str, str]:
    value = data.get(key)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FamilySpecError(f"{yaml_path}: '{key}' must map names to strings, got {value!r}")
    return value
