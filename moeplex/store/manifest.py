"""The store manifest: schema version, dataclasses, JSON reading and writing with clear errors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeplex.store.errors import StoreError
from moeplex.store.json_files import read_json
from moeplex.store.layout import MANIFEST

SCHEMA_VERSION = 1

# One row per layer: the expert id of each expert index, or None for a dense (expert-free) layer.
ExpertTable = list[list[str] | None]


@dataclass(frozen=True)
class BlobEntry:
    """One file of the store: its path relative to the store root, its size, its sha256."""

    file: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SourceInfo:
    """A checkpoint the store was made from, fingerprinted cheaply (config + safetensors headers)."""

    path: str
    fingerprint: str
    bytes: int  # size of its safetensors files


@dataclass
class Manifest:
    """Everything a reader needs to know about a store; see docs/store-format.md."""

    schema_version: int
    family: str  # the family's name (from its YAML)
    architecture: str  # moeplex family module: mixtral, qwen2_moe, ...
    hf_architecture: str  # transformers class name, e.g. MixtralForCausalLM
    variants: list[str]
    sources: dict[str, SourceInfo]  # checkpoint name -> where the store's weights came from
    plan: dict  # ConsolidationPlan.to_json()
    expert_tables: dict[str, ExpertTable]  # variant -> [layer][expert] -> expert id
    experts: dict[str, BlobEntry]  # expert id (sha256 of its blob) -> blob
    backbones: dict[str, BlobEntry]  # variant -> its backbone blob
    variant_files: dict[str, dict[str, BlobEntry]]  # variant -> {"config.json": blob, ...}
    tokenizer: dict[str, BlobEntry]  # tokenizer file name -> blob
    dtypes: dict[str, list[str]]  # {"experts": [...], "backbones": [...]}: the dtypes stored
    bytes: dict[str, int]  # experts, backbones, store_total, sources_total, one_model
    base: str | None = None  # the name of the checkpoint the variants were fine-tuned from, if the family has one
    own_domain: dict[str, str] = field(default_factory=dict)  # variant -> the domain it was fine-tuned on (family YAML), where given

    def blobs(self) -> list[tuple[str, BlobEntry]]:
        """(what it is, entry) for every file the manifest lists."""
        listed = [(f"expert {expert_id}", entry) for expert_id, entry in self.experts.items()]
        listed += [(f"backbone of '{variant}'", entry) for variant, entry in self.backbones.items()]
        for variant, files in self.variant_files.items():
            listed += [(f"{name} of '{variant}'", entry) for name, entry in files.items()]
        listed += [(f"tokenizer file {name}", entry) for name, entry in self.tokenizer.items()]
        return listed

    def referenced_expert_ids(self) -> set[str]:
        return {expert_id for table in self.expert_tables.values() for row in table if row for expert_id in row}

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: dict, where: Path) -> "Manifest":
        """Parse and check the manifest's structure; raises StoreError naming `where` and the field."""
        fields = _Fields(data, where)
        version = fields.get("schema_version", int)
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema_version {version} is not supported (this moeplex reads {SCHEMA_VERSION})"
            )
        manifest = Manifest(
            schema_version=version,
            family=fields.get("family", str),
            architecture=fields.get("architecture", str),
            hf_architecture=fields.get("hf_architecture", str),
            variants=fields.get("variants", list),
            sources={n: fields.record(SourceInfo, info, f"sources.{n}") for n, info in fields.items("sources")},
            plan=fields.get("plan", dict),
            expert_tables=fields.get("expert_tables", dict),
            experts=fields.blob_map("experts"),
            backbones=fields.blob_map("backbones"),
            variant_files={
                v: fields.blob_map(f"variant_files.{v}", blobs) for v, blobs in fields.items("variant_files")
            },
            tokenizer=fields.blob_map("tokenizer"),
            dtypes=fields.get("dtypes", dict),
            bytes=fields.get("bytes", dict),
            base=fields.optional("base", str),
            own_domain=fields.optional("own_domain", dict) or {},
        )
        _check_every_variant_is_complete(manifest, where)
        _check_own_domain_names_variants(manifest, where)
        _check_tables_are_well_formed(manifest, where)
        return manifest


def read_manifest(root: Path) -> Manifest:
    """The manifest of the store at root; StoreError if it is missing, truncated, malformed or too new."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        kind = "folder has no" if Path(root).is_dir() else "store not found; expected"
        raise StoreError(f"{root}: {kind} {MANIFEST}; is this a moeplex store?")
    data = read_json(path, "the store is damaged, rewrite it")
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return Manifest.from_json(data, path)


def manifest_text(manifest: Manifest) -> str:
    return json.dumps(manifest.to_json(), indent=1) + "\n"


class _Fields:
    """Typed access to the manifest's JSON with errors that name the file and the field."""

    def __init__(self, data: dict, where: Path):
        self.data, self.where = data, where

    def optional(self, key: str, kind: type):
        """The field's value, or None when it is absent or null."""
        return None if self.data.get(key) is None else self.get(key, kind)

    def get(self, key: str, kind: type):
        value = self.data.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise StoreError(f"{self.where}: field '{key}' is missing or not a {kind.__name__}")
        return value

    def items(self, key: str):
        return self.get(key, dict).items()

    def record(self, cls: type, value, name: str):
        if not isinstance(value, dict):
            raise StoreError(f"{self.where}: field '{name}' is not an object")
        try:
            return cls(**value)
        except TypeError as exc:
            raise StoreError(f"{self.where}: field '{name}' is malformed ({exc})") from exc

    def blob_map(self, name: str, value=None) -> dict[str, BlobEntry]:
        value = self.get(name, dict) if value is None else value
        if not isinstance(value, dict):
            raise StoreError(f"{self.where}: field '{name}' is not an object")
        return {key: self.record(BlobEntry, entry, f"{name}.{key}") for key, entry in value.items()}


def _check_every_variant_is_complete(manifest: Manifest, where: Path) -> None:
    for variant in manifest.variants:
        if variant not in manifest.expert_tables:
            raise StoreError(f"{where}: variant '{variant}' has no expert table")
        if variant not in manifest.backbones:
            raise StoreError(f"{where}: variant '{variant}' has no backbone")
        if "config.json" not in manifest.variant_files.get(variant, {}):
            raise StoreError(f"{where}: variant '{variant}' has no config.json")


def _check_own_domain_names_variants(manifest: Manifest, where: Path) -> None:
    for variant, domain in manifest.own_domain.items():
        if variant not in manifest.variants or not isinstance(domain, str):
            raise StoreError(f"{where}: field 'own_domain' maps '{variant}' to {domain!r}; expected a variant and a domain name")


def _check_tables_are_well_formed(manifest: Manifest, where: Path) -> None:
    for variant, table in manifest.expert_tables.items():
        rows_ok = isinstance(table, list) and all(
            row is None or (isinstance(row, list) and all(isinstance(i, str) for i in row)) for row in table
        )
        if not rows_ok:
            raise StoreError(f"{where}: expert table of '{variant}' must be a list of rows (null or expert ids)")
