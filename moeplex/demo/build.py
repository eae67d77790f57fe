"""Builds the demo family into the cache, atomically and only once per recipe, and loads it back."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from moeplex.demo import corpora, perturb, train
from moeplex.demo.recipes import (
    DEMO_SIZES,
    VARIANT_DOMAINS,
    BenchRecipe,
    TinyRecipe,
    recipe_for,
    recipe_hash,
    recipe_record,
    stage_seed,
)
from moeplex.demo.tokenizer import save_tokenizer, train_tokenizer

COMPLETE_MARKER = "COMPLETE.json"
SPEC_FILE = "family.yaml"
RECIPE_FILE = "recipe.json"
BASE_DIR = "base"
VARIANTS_DIR = "variants"


@dataclass(frozen=True)
class DemoFamily:
    """A built demo family: Hugging Face checkpoint folders of the base and of each variant."""

    root: Path
    base: Path
    variants: dict[str, Path]
    own_domain: dict[str, str]
    spec_file: Path
    size: str


class DemoFamilyMissingError(FileNotFoundError):
    """Raised when a demo family has not been built (or was built by another recipe)."""


def cache_dir() -> Path:
    """moeplex's cache: $MOEPLEX_CACHE, else $XDG_CACHE_HOME/moeplex, else ~/.cache/moeplex."""
    if os.environ.get("MOEPLEX_CACHE"):
        return Path(os.environ["MOEPLEX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moeplex"


def demo_root(size: str = "tiny", seed: int = 0) -> Path:
    """Where the demo family of this size and seed lives: <cache>/demo/<size>-seed<seed>."""
    if size not in DEMO_SIZES:
        raise ValueError(f"unknown demo size {size!r}; expected one of {DEMO_SIZES}")
    return cache_dir() / "demo" / f"{size}-seed{seed}"


def is_complete(root: Path, expected_hash: str) -> bool:
    """Whether root holds a finished family built by the recipe with expected_hash."""
    marker = root / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("recipe_hash") == expected_hash
    except json.JSONDecodeError:
        return False


def family_from_root(root: Path) -> DemoFamily:
    """The DemoFamily described by root's family.yaml."""
    spec_file = root / SPEC_FILE
    spec = yaml.safe_load(spec_file.read_text())
    return DemoFamily(
        root=root,
        base=root / spec["base"],
        variants={name: root / path for name, path in spec["variants"].items()},
        own_domain=dict(spec["own_domain"]),
        spec_file=spec_file,
        size=spec["name"].removeprefix("demo-"),
    )


def load_demo_family(size: str = "tiny", seed: int = 0) -> DemoFamily:
    """The built demo family; raises DemoFamilyMissingError telling how to build it when it is missing or stale."""
    root = demo_root(size, seed)
    expected = recipe_hash(recipe_record(size, seed, recipe_for(size)))
    if not is_complete(root, expected):
        state = "was built by another recipe" if (root / COMPLETE_MARKER).exists() else "is not built"
        raise DemoFamilyMissingError(
            f"the {size} demo family (seed {seed}) at {root} {state}; run `moeplex demo build --size {size}` first"
        )
    return family_from_root(root)


@contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Holds an exclusive lock for building root, so concurrent builds of one family wait for each other."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def remove_leftovers(root: Path) -> None:
    """Removes staging and retired folders that a killed build of root left behind; call it holding the lock."""
    for leftover in root.parent.glob(f".{root.name}.*-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def staging_dir(root: Path) -> Iterator[Path]:
    """A fresh temporary folder next to root; removed unless it was published (renamed away) meanwhile."""
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    staging.chmod(0o755)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, root: Path) -> None:
    """Moves a finished staging folder to root, replacing whatever was there."""
    if root.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.retired-", dir=root.parent))
        root.rename(retired / root.name)
        staging.rename(root)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(root)


def write_spec(folder: Path, size: str) -> None:
    """Writes family.yaml: the base and variants as paths relative to the family root."""
    spec = {
        "name": f"demo-{size}",
        "base": BASE_DIR,
        "variants": {name: f"{VARIANTS_DIR}/{name}" for name in VARIANT_DOMAINS},
        "own_domain": dict(VARIANT_DOMAINS),
    }
    (folder / SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))


def write_json(path: Path, data: dict) -> None:
    """Writes data as indented, key-sorted JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def corpus_summary() -> dict[str, dict[str, int]]:
    """Documents and characters per domain and split, recorded with the family."""
    return {
        domain: {
            f"{split}_{unit}": value
            for split in corpora.SPLITS
            for unit, value in (
                ("documents", len(corpora.load_documents(domain, split))),
                ("chars", sum(map(len, corpora.load_documents(domain, split)))),
            )
        }
        for domain in corpora.DOMAINS
    }


def train_family_tokenizer(recipe: TinyRecipe | BenchRecipe) -> PreTrainedTokenizerBase:
    """Trains the family's tokenizer on the train splits of all domains."""
    texts = [corpora.domain_text(d, "train", recipe.tokenizer.chars_per_domain) for d in corpora.DOMAINS]
    return train_tokenizer(texts, recipe.tokenizer.vocab_size)


def save_checkpoint(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Saves model weights, config, generation config and tokenizer as one Hugging Face folder."""
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)


def build_tiny(folder: Path, recipe: TinyRecipe, seed: int) -> dict:
    """Trains the tiny family into folder; returns own-domain heldout perplexities of base and variants."""
    tokenizer = train_family_tokenizer(recipe)
    train_streams = {
        domain: train.token_stream(tokenizer, corpora.capped_documents(domain, "train", recipe.train_chars_per_domain))
        for domain in corpora.DOMAINS
    }
    heldout_streams = {
        domain: train.token_stream(tokenizer, corpora.load_documents(domain, "heldout")) for domain in corpora.DOMAINS
    }
    seq_len = recipe.pretrain.seq_len
    config = train.mixtral_config(recipe.dims, tokenizer, recipe.pretrain.router_aux_loss_coef)
    base = train.new_model(config, seed)
    pretrain_loss = train.train(
        base, list(train_streams.values()), recipe.pretrain, stage_seed(seed, "pretrain"), "pretrain base"
    )
    save_checkpoint(base, tokenizer, folder / BASE_DIR)
    base_ppl = {
        domain: train.perplexity(base, stream, seq_len, recipe.eval_tokens)
        for domain, stream in heldout_streams.items()
    }
    quality = {}
    for name, domain in VARIANT_DOMAINS.items():
        variant_seed = stage_seed(seed, f"fine-tune/{name}")
        variant, fine_tune_loss = train.fine_tune(
            base, train_streams[domain], recipe.fine_tune, variant_seed, f"fine-tune {name}"
        )
        save_checkpoint(variant, tokenizer, folder / VARIANTS_DIR / name)
        variant_ppl = train.perplexity(variant, heldout_streams[domain], seq_len, recipe.eval_tokens)
        quality[name] = {
            "domain": domain,
            "fine_tune_loss": round(fine_tune_loss, 4),
            "base_ppl": round(base_ppl[domain], 3),
            "variant_ppl": round(variant_ppl, 3),
            "ratio": round(variant_ppl / base_ppl[domain], 4),
        }
    return {"pretrain_loss": round(pretrain_loss, 4), "heldout_perplexity": quality}


def build_bench(folder: Path, recipe: BenchRecipe, seed: int) -> dict:
    """Writes the bench family into folder; returns the parameter count and each variant's expert changes."""
    tokenizer = train_family_tokenizer(recipe)
    config = train.mixtral_config(recipe.dims, tokenizer)
    config.initializer_range = recipe.init_std
    parameters = perturb.parameter_count(config)
    if parameters < recipe.min_parameters:
        raise ValueError(f"bench recipe makes {parameters:,} parameters, fewer than {recipe.min_parameters:,}")
    base_dir = folder / BASE_DIR
    perturb.save_random_model(config, getattr(torch, recipe.dtype), seed, base_dir)
    save_tokenizer(tokenizer, base_dir)
    gc.collect()
    changes = {}
    for name in VARIANT_DOMAINS:
        variant_seed = stage_seed(seed, f"perturb/{name}")
        assignment = perturb.assign_expert_changes(
            recipe.dims.num_layers, recipe.dims.num_experts, recipe.expert_changes, variant_seed
        )
        variant_dir = folder / VARIANTS_DIR / name
        perturb.save_perturbed_variant(
            base_dir, variant_dir, recipe.expert_changes, assignment, recipe.backbone_relative_noise, variant_seed
        )
        save_tokenizer(tokenizer, variant_dir)
        changes[name] = assignment
        gc.collect()
    return {"parameters": parameters, "expert_changes": changes}


def build_into(folder: Path, size: str, seed: int, record: dict) -> dict:
    """Builds every file of a family into folder, the completion marker last; returns the build report."""
    started = time.perf_counter()
    threads = train.use_all_cores()
    recipe = recipe_for(size)
    builder = build_tiny if isinstance(recipe, TinyRecipe) else build_bench
    report = builder(folder, recipe, seed)
    write_spec(folder, size)
    report = {**report, "build_seconds": round(time.perf_counter() - started, 1), "torch_threads": threads}
    write_json(folder / RECIPE_FILE, {**record, "corpora": corpus_summary(), "report": report})
    write_json(folder / COMPLETE_MARKER, {"recipe_hash": recipe_hash(record), "size": size, "seed": seed})
    return report


def summary_line(family: DemoFamily, report: dict) -> str:
    """One line about a fresh build: where, how long, and its quality or size."""
    seconds = report["build_seconds"]
    line = f"demo-{family.size}: base + {len(family.variants)} variants in {family.root} ({seconds:.0f} s)"
    if "heldout_perplexity" in report:
        ratios = ", ".join(f"{n} {q['ratio']:.2f}" for n, q in report["heldout_perplexity"].items())
        return f"{line}; own-domain heldout ppl variant/base: {ratios}"
    return f"{line}; {report['parameters'] / 1e6:.0f}M parameters per model"


def build_demo_family(size: str = "tiny", seed: int = 0, force: bool = False) -> DemoFamily:
    """Builds the demo family of this size and seed into the cache unless a complete one is there; returns it."""
    root = demo_root(size, seed)
    record = recipe_record(size, seed, recipe_for(size))
    with build_lock(root):
        if not force and is_complete(root, recipe_hash(record)):
            return family_from_root(root)
        remove_leftovers(root)
        with staging_dir(root) as staging:
            report = build_into(staging, size, seed, record)
            publish(staging, root)
    family = family_from_root(root)
    print(summary_line(family, report), file=sys.stderr)
    return family
