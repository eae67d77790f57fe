"""Registry of supported architectures: find the family module for a Hugging Face config."""

from __future__ import annotations

from moeplex.errors import UnsupportedModelError
from moeplex.families import mixtral, olmoe, qwen2_moe, qwen3_moe, switch_transformers
from moeplex.families.base import Family

# switch_transformers is consolidated and exported only; the runtime refuses it (base.require_runtime).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (mixtral.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY, switch_transformers.FAMILY)
}


def family_for_config(config: dict) -> Family:
    """The family whose model_type matches the config, or a clear error listing what is supported."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise UnsupportedModelError(f"unsupported architecture model_type={model_type!r}; supported: {supported}")
