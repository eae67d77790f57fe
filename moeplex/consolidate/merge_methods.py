"""Tensor math of the model-merging baselines (average, task arithmetic, TIES, DARE), all in fp32.

Every function takes the tensors of one parameter (the base's and each variant's, same shape, any
float dtype) and returns the merged parameter in fp32; casting back is the caller's job. A *task
vector* is `variant - base`.

- average:         mean_i(variant_i)
- task arithmetic: base + scale * sum_i(tau_i)                          (Ilharco et al. 2023)
- TIES:            trim each tau_i to its top-`density` magnitudes, elect a sign per entry by
                   summed mass, average only the entries that agree with it (disjoint mean),
                   base + scale * merged                                (Yadav et al. 2023)
- DARE:            drop each entry of tau_i with probability `drop_rate`, rescale survivors by
                   1 / (1 - drop_rate), then task arithmetic            (Yu et al. 2023)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Plain mean of the variants' tensors."""
    _check_nonempty(tensors)
    total = tensors[0].float().clone()
    for tensor in tensors[1:]:
        total += tensor.float()
    return total / len(tensors)


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """variant - base for each variant, in fp32."""
    _check_nonempty(tensors)
    base32 = base.float()
    return [tensor.float() - base32 for tensor in tensors]


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """base + scale * sum of the task vectors."""
    return _add_scaled_sum(base, task_vectors(base, tensors), scale)


def trim_to_density(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the entries whose magnitude is among the round(density * numel) largest (at least one;
    entries tied with the smallest kept magnitude are kept too, as in the reference TIES code); zeroes
    the rest. CPU tensors: the threshold comes from numpy's partition, faster there than torch.topk."""
    check_density(density)
    magnitude = task_vector.abs()
    flat = magnitude.reshape(-1).numpy()
    keep = max(1, round(density * flat.size))
    threshold = float(np.partition(flat, flat.size - keep)[flat.size - keep])
    return torch.where(magnitude >= threshold, task_vector, 0.0)


def elect_sign(stacked: torch.Tensor) -> torch.Tensor:
    """Sign per entry of stacked task vectors [N, ...]: the sign with the larger summed magnitude.

    Entries whose mass is exactly balanced (or all zero) take the sign elected by most entries of
    the tensor, as in the reference TIES code; +1 if that is balanced too.
    """
    sign = stacked.sum(dim=0).sign()  # [...]
    overall = 1.0 if sign.sum() >= 0 else -1.0
    return torch.where(sign == 0, torch.full_like(sign, overall), sign)


def disjoint_mean(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean per entry over the task-vector entries whose sign equals `sign` (±1); 0 where none do."""
    agrees = stacked.sign() == sign  # [N, ...]; zeros never agree, `sign` has no zeros
    count = agrees.sum(dim=0).clamp(min=1)
    return torch.where(agrees, stacked, 0.0).sum(dim=0) / count


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    """TIES-merging: trim, elect sign, disjoint mean, then base + scale * merged."""
    trimmed = torch.stack([trim_to_density(tau, density) for tau in task_vectors(base, tensors)])  # [N, ...]
    merged = disjoint_mean(trimmed, elect_sign(trimmed))
    return base.float() + scale * merged


def drop_and_rescale(task_vector: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Zeroes each entry with probability drop_rate and divides the survivors by 1 - drop_rate."""
    check_drop_rate(drop_rate)
    keep = torch.rand(task_vector.shape, generator=generator) >= drop_rate
    return task_vector * keep / (1.0 - drop_rate)


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    drop_rate: float,
    scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """DARE: drop-and-rescale each task vector, then task arithmetic."""
    dropped = [drop_and_rescale(tau, drop_rate, generator) for tau in task_vectors(base, tensors)]
    return _add_scaled_sum(base, dropped, scale)


def check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def check_drop_rate(drop_rate: float) -> None:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


def check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale}")


def _add_scaled_sum(base: torch.Tensor, vectors: list[torch.Tensor], scale: float) -> torch.Tensor:
    total = vectors[0].clone()
    for vector in vectors[1:]:
        total += vector
    return base.float() + scale * total


def _check_nonempty(tensors: Sequence[torch.Tensor]) -> None:
    if not tensors:
        raise ValueError("merging needs at least one variant tensor")
