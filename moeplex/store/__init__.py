"""The store: every unique expert once, each variant's backbone, and a manifest mapping positions to experts."""

from moeplex.store.errors import StoreError
from moeplex.store.export import export_variant
from moeplex.store.manifest import SCHEMA_VERSION, Manifest, read_manifest
from moeplex.store.reader import StoreReader
from moeplex.store.verify import verify_store
from moeplex.store.writer import write_store

__all__ = [
    "SCHEMA_VERSION",
    "Manifest",
    "StoreError",
    "StoreReader",
    "export_variant",
    "read_manifest",
    "verify_store",
    "write_store",
]
