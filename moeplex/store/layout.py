"""Where each file lives inside a store folder (paths relative to the store root)."""

from __future__ import annotations

MANIFEST = "manifest.json"
EXPERTS = "experts"
BACKBONES = "backbones"
CONFIGS = "configs"
TOKENIZER = "tokenizer"
QUANTIZED = "quantized"  # quantized copies of experts, outside the manifest (moeplex.store.copy_index)
QUANTIZED_INDEX = f"{QUANTIZED}/index.json"

# Files of a checkpoint folder that describe a variant rather than hold weights; copied per variant.
VARIANT_FILES = ("config.json", "generation_config.json")

# Tokenizer files copied (those present) from the first variant's folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def expert_file(expert_id: str) -> str:
    return f"{EXPERTS}/{expert_id}.safetensors"


def backbone_file(variant: str) -> str:
    return f"{BACKBONES}/{variant}.safetensors"


def variant_file(variant: str, name: str) -> str:
    return f"{CONFIGS}/{variant}/{name}"


def tokenizer_file(name: str) -> str:
    return f"{TOKENIZER}/{name}"


def quantized_file(copy_format: str, expert_id: str) -> str:
    return f"{QUANTIZED}/{copy_format}/{expert_id}.safetensors"
