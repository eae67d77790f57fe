"""Model-merging baselines: fold several fine-tuned variants of one base into one checkpoint folder.

`merge_checkpoints` reads the variants (and the base, for methods that need it) lazily, tensor by
tensor, merges each parameter with the math in `merge_methods` (fp32, cast back to the first
variant's dtype), and writes a Hugging Face folder: safetensors shard(s), the first variant's config,
generation config and tokenizer files, and `merge.json` recording how it was made.

Memory bound: merged output is written in shards of at most `max_shard_bytes` (default 1 GiB), and
`save_file` serializes a shard in memory before writing it, so about 2 x max_shard_bytes of output,
plus one parameter of every input (as stored and in fp32) and the method's intermediates (TIES
stacks the N trimmed task vectors of one parameter); inputs are memory-mapped and read one
parameter at a time. Measured: 3 variants + base of 200 MB each, 20 MB shards -> 50-180 MB of
anonymous memory above the interpreter's.

The folder is built in a temporary sibling directory and renamed into place, so `out` either
appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from moeplex.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader
from moeplex.consolidate import merge_methods
from moeplex.errors import CheckpointError, MoeplexError

MERGE_METHODS = ("average", "task-arithmetic", "ties", "dare")
METHODS_NEEDING_BASE = ("task-arithmetic", "ties", "dare")
DEFAULT_SCALE = {"task-arithmetic": 0.4, "ties": 1.0, "dare": 0.4}
DEFAULT_DENSITY = 0.2
DEFAULT_DROP_RATE = 0.9
MAX_SHARD_BYTES = 1024**3
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
RECORD_FILE = "merge.json"


@dataclass(frozen=True)
class MergeSettings:
    """One method with its options resolved (defaults filled in, ranges checked)."""

    method: str
    scale: float | None
    density: float | None
    drop_rate: float | None
    seed: int

    @staticmethod
    def resolve(method: str, scale: float | None, density: float | None, drop_rate: float | None, seed: int):
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method '{method}'; choose one of {', '.join(MERGE_METHODS)}")
        uses = {"scale": method in DEFAULT_SCALE, "density": method == "ties", "drop_rate": method == "dare"}
        defaults = {"scale": DEFAULT_SCALE.get(method), "density": DEFAULT_DENSITY, "drop_rate": DEFAULT_DROP_RATE}
        values = {}
        for option, value in {"scale": scale, "density": density, "drop_rate": drop_rate}.items():
            if value is not None and not uses[option]:
                raise ValueError(f"merge method '{method}' does not take {option}")
            values[option] = (defaults[option] if value is None else value) if uses[option] else None
        settings = MergeSettings(method=method, seed=seed, **values)
        if settings.scale is not None:
            merge_methods.check_scale(settings.scale)
        if settings.density is not None:
            merge_methods.check_density(settings.density)
        if settings.drop_rate is not None:
            merge_methods.check_drop_rate(settings.drop_rate)
        return settings

    def merge(self, key: str, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The merged fp32 value of parameter `key`."""
        if self.method == "average":
            return merge_methods.average(tensors)
        if self.method == "task-arithmetic":
            return merge_methods.task_arithmetic(base, tensors, self.scale)
        if self.method == "ties":
            return merge_methods.ties(base, tensors, self.density, self.scale)
        generator = torch.Generator().manual_seed(tensor_seed(self.seed, key))
        return merge_methods.dare(base, tensors, self.drop_rate, self.scale, generator)


def tensor_seed(seed: int, key: str) -> int:
    """DARE's seed for one parameter: depends on the run seed and the key, not on visiting order."""
    return (seed * 0x9E3779B1 + zlib.crc32(key.encode())) % 2**63


def merge_checkpoints(
    method: str,
    variants: list[Path],
    out: Path,
    base: Path | None = None,
    *,
    scale: float | None = None,
    density: float | None = None,
    drop_rate: float | None = None,
    seed: int = 0,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Merges `variants` (fine-tuned from `base`) with `method` into a new checkpoint folder `out`.

    scale: lambda of task-arithmetic (default 0.4), ties (1.0) and dare (0.4); density: fraction of
    each task vector TIES keeps (0.2); drop_rate: DARE's drop probability (0.9); seed: DARE's seed.
    Options a method does not use must be left None. Raises ValueError for a bad method, option or
    a missing base, CheckpointError when the checkpoints do not match, MoeplexError if `out` exists
    and is not empty. Returns `out`.
    """
    settings = MergeSettings.resolve(method, scale, density, drop_rate, seed)
    if not variants:
        raise ValueError("merging needs at least one variant folder")
    if method in METHODS_NEEDING_BASE and base is None:
        raise ValueError(f"merge method '{method}' needs the base checkpoint the variants were fine-tuned from")
    if method not in METHODS_NEEDING_BASE and base is not None:
        raise ValueError(f"merge method '{method}' does not use a base checkpoint")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoeplexError(f"{out} already exists and is not an empty folder; remove it or choose another")

    readers = [CheckpointReader(folder) for folder in variants]
    base_reader = CheckpointReader(base) if base is not None else None
    keys = _matching_keys(readers, base_reader)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _write_merged(settings, keys, readers, base_reader, staging, max_shard_bytes, progress)
        _copy_side_files(readers[0].folder, staging)
        _write_record(settings, variants, base, staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _matching_keys(readers: list[CheckpointReader], base: CheckpointReader | None) -> list[str]:
    """The first variant's keys, in file order, after checking every other input has the same keys and shapes."""
    reference = readers[0]
    keys = sorted(reference.keys(), key=lambda k: (reference.file_of(k).name, k))
    shapes = {key: reference.shape(key) for key in keys}
    for reader in readers[1:] + ([base] if base is not None else []):
        missing = [key for key in keys if not reader.has(key)]
        if missing:
            raise CheckpointError(
                f"{reader.folder}: tensor '{missing[0]}' of {reference.folder} is missing "
                f"({len(missing)} missing in all); merged checkpoints must have the same tensors"
            )
        extra = sorted(set(reader.keys()) - set(keys))
        if extra:
            raise CheckpointError(
                f"{reader.folder}: tensor '{extra[0]}' is not in {reference.folder} "
                f"({len(extra)} extra in all); merged checkpoints must have the same tensors"
            )
        for key in keys:
            if reader.shape(key) != shapes[key]:
                raise CheckpointError(
                    f"{reader.folder}: tensor '{key}' has shape {reader.shape(key)} "
                    f"but {shapes[key]} in {reference.folder}"
                )
    return keys


def _write_merged(
    settings: MergeSettings,
    keys: list[str],
    readers: list[CheckpointReader],
    base: CheckpointReader | None,
    folder: Path,
    max_shard_bytes: int,
    progress: bool,
) -> None:
    writer = ShardWriter(folder, max_shard_bytes)
    for key in tqdm(keys, desc=f"merge ({settings.method})", unit="tensor", disable=not progress):
        tensors = [reader.get(key) for reader in readers]
        base_tensor = base.get(key) if base is not None else None
        if tensors[0].is_floating_point():
            merged = settings.merge(key, base_tensor, tensors).to(tensors[0].dtype)
        else:
            merged = _identical_or_fail(key, readers, tensors, base, base_tensor)
        writer.add(key, merged)
    writer.finish()


def _identical_or_fail(
    key: str,
    readers: list[CheckpointReader],
    tensors: list[torch.Tensor],
    base: CheckpointReader | None,
    base_tensor: torch.Tensor | None,
) -> torch.Tensor:
    """Integer or bool tensors are not merged: they must be equal everywhere and are copied."""
    inputs = list(zip(readers, tensors)) + ([(base, base_tensor)] if base is not None else [])
    for reader, tensor in inputs:
        if not torch.equal(tensor, tensors[0]):
            raise CheckpointError(
                f"{reader.folder}: non-float tensor '{key}' differs from {readers[0].folder}; it cannot be merged"
            )
    return tensors[0]


class ShardWriter:
    """Collects tensors and writes them as safetensors files of at most `max_bytes` each (one tensor
    larger than that gets a file of its own); several files get Hugging Face names and an index."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[list[str]] = []  # keys of each file written so far
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def finish(self) -> None:
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            self._staged(0).rename(self.folder / SINGLE_FILE)
            return
        count = len(self.written)
        weight_map = {}
        for number, keys in enumerate(self.written):
            name = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            self._staged(number).rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _flush(self) -> None:
        save_file(self.pending, str(self._staged(len(self.written))), metadata={"format": "pt"})
        self.written.append(list(self.pending))
        self.pending = {}
        self.pending_bytes = 0

    def _staged(self, number: int) -> Path:
        return self.folder / f"staged-{number:05d}.safetensors"


def _copy_side_files(source: Path, folder: Path) -> None:
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def _write_record(settings: MergeSettings, variants: list[Path], base: Path | None, folder: Path) -> None:
    record = {
        "method": settings.method,
        "variants": [str(Path(v).resolve()) for v in variants],
        "base": str(Path(base).resolve()) if base is not None else None,
        "scale": settings.scale,
        "density": settings.density,
        "drop_rate": settings.drop_rate,
        "seed": settings.seed if settings.method == "dare" else None,
    }
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
