"""The recipes of the demo family sizes: model shapes, training schedules, perturbation levels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from moeplex.demo.train import ModelDims, TrainingSchedule

RECIPE_VERSION = 1
DEMO_SIZES: tuple[str, ...] = ("tiny", "bench")
VARIANT_DOMAINS: dict[str, str] = {"python": "python", "cpp": "cpp", "prose": "prose", "licenses": "licenses"}


@dataclass(frozen=True)
class TokenizerRecipe:
    """The byte-level BPE shared by the family, trained on the first chars_per_domain of each train split."""

    vocab_size: int = 4096
    chars_per_domain: int = 1_000_000


@dataclass(frozen=True)
class TinyRecipe:
    """A trained family: a base pretrained on all domains, one variant fine-tuned per domain."""

    tokenizer: TokenizerRecipe
    dims: ModelDims
    train_chars_per_domain: int
    pretrain: TrainingSchedule
    fine_tune: TrainingSchedule
    eval_tokens: int


@dataclass(frozen=True)
class ExpertChange:
    """A share of a variant's expert positions and the Gaussian noise added to them, relative to each tensor's RMS."""

    name: str
    fraction: float
    relative_noise: float


@dataclass(frozen=True)
class BenchRecipe:
    """An untrained, randomly initialized family; variants are controlled perturbations of the base."""

    tokenizer: TokenizerRecipe
    dims: ModelDims
    init_std: float
    expert_changes: tuple[ExpertChange, ...]
    backbone_relative_noise: float
    dtype: str = "bfloat16"
    min_parameters: int = 300_000_000


TINY_RECIPE = TinyRecipe(
    tokenizer=TokenizerRecipe(),
    dims=ModelDims(
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        num_experts=8,
        experts_per_token=2,
        intermediate_size=256,
        max_position_embeddings=2048,
    ),
    train_chars_per_domain=1_500_000,
    pretrain=TrainingSchedule(steps=400, batch_size=4, seq_len=256, lr=5e-3, warmup_steps=20),
    fine_tune=TrainingSchedule(steps=150, batch_size=4, seq_len=256, lr=1e-3, warmup_steps=10),
    eval_tokens=16384,
)

BENCH_RECIPE = BenchRecipe(
    tokenizer=TokenizerRecipe(),
    dims=ModelDims(
        hidden_size=1024,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        num_experts=8,
        experts_per_token=2,
        intermediate_size=2048,
        max_position_embeddings=4096,
    ),
    init_std=0.02,
    expert_changes=(
        ExpertChange(name="identical", fraction=0.5, relative_noise=0.0),
        ExpertChange(name="slight", fraction=0.3, relative_noise=0.02),
        ExpertChange(name="heavy", fraction=0.2, relative_noise=0.5),
    ),
    backbone_relative_noise=0.01,
)

RECIPES: dict[str, TinyRecipe | BenchRecipe] = {"tiny": TINY_RECIPE, "bench": BENCH_RECIPE}


def recipe_for(size: str) -> TinyRecipe | BenchRecipe:
    """The recipe of a demo size."""
    if size not in RECIPES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {DEMO_SIZES}")
    return RECIPES[size]


def recipe_record(size: str, seed: int, recipe: TinyRecipe | BenchRecipe) -> dict:
    """Everything that decides a family's bytes, as plain JSON data."""
    return {
        "version": RECIPE_VERSION,
        "size": size,
        "seed": seed,
        "variants": VARIANT_DOMAINS,
        "recipe": dataclasses.asdict(recipe),
    }


def recipe_hash(record: dict) -> str:
    """A stable hash of a recipe record; a family built from another hash is stale."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def stage_seed(seed: int, stage: str) -> int:
    """A seed for one stage of a build (a variant, a tensor), derived from the family seed."""
    digest = hashlib.sha256(f"{seed}\0{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)
