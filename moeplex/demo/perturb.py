"""Bench-size demo models: a randomly initialized base and variants made by controlled expert perturbation."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

from moeplex.demo.recipes import ExpertChange, stage_seed

WEIGHTS_FILE = "model.safetensors"
EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w[123]\.weight$")
COPIED_FILES = ("config.json", "generation_config.json")

ExpertPosition = tuple[int, int]


def parameter_count(config: MixtralConfig) -> int:
    """Parameters of a MixtralForCausalLM with this config, counted without allocating it."""
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def save_random_model(config: MixtralConfig, dtype: torch.dtype, seed: int, folder: Path) -> None:
    """Initializes a model directly in dtype (normal(0, config.initializer_range) weights) and saves it."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM._from_config(config, dtype=dtype)
    model.save_pretrained(folder)


def assign_expert_changes(
    num_layers: int, num_experts: int, changes: Sequence[ExpertChange], seed: int
) -> dict[str, list[ExpertPosition]]:
    """All (layer, expert) positions, shuffled by seed, split among the changes by fraction; the last takes the rest."""
    positions = [(layer, expert) for layer in range(num_layers) for expert in range(num_experts)]
    order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [positions[i] for i in order]
    assignment: dict[str, list[ExpertPosition]] = {}
    start = 0
    for index, change in enumerate(changes):
        end = len(shuffled) if index == len(changes) - 1 else start + round(change.fraction * len(shuffled))
        assignment[change.name] = sorted(shuffled[start:end])
        start = end
    return assignment


def with_relative_noise(tensor: torch.Tensor, relative_noise: float, seed: int) -> torch.Tensor:
    """tensor + N(0, (relative_noise * rms(tensor))^2), computed in fp32, cast back; the same tensor when noise is 0."""
    if relative_noise == 0.0:
        return tensor
    values = tensor.float()
    rms = values.pow(2).mean().sqrt()
    noise = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (values + noise * (relative_noise * rms)).to(tensor.dtype)


def noise_level_per_key(
    key: str, changes: Sequence[ExpertChange], assignment: dict[str, list[ExpertPosition]], backbone_noise: float
) -> float:
    """The relative noise a checkpoint tensor gets: its expert position's change, or the backbone level."""
    match = EXPERT_KEY.match(key)
    if match is None:
        return backbone_noise
    position = (int(match.group(1)), int(match.group(2)))
    for change in changes:
        if position in assignment[change.name]:
            return change.relative_noise
    raise ValueError(f"expert position {position} of {key} has no assigned change")


def save_perturbed_variant(
    base: Path,
    variant: Path,
    changes: Sequence[ExpertChange],
    assignment: dict[str, list[ExpertPosition]],
    backbone_noise: float,
    seed: int,
) -> None:
    """Writes a variant checkpoint: base's tensors with per-tensor seeded noise; unchanged experts keep base's bytes."""
    variant.mkdir(parents=True)
    tensors = {}
    with safe_open(base / WEIGHTS_FILE, framework="pt") as weights:
        metadata = weights.metadata()
        for key in weights.keys():
            level = noise_level_per_key(key, changes, assignment, backbone_noise)
            tensors[key] = with_relative_noise(weights.get_tensor(key), level, stage_seed(seed, key)).contiguous()
    save_file(tensors, variant / WEIGHTS_FILE, metadata=metadata)
    for name in COPIED_FILES:
        shutil.copy2(base / name, variant / name)
