"""Grouped matmuls: rows of a flat batch, sorted into groups, each group times its own matrix.

Expert dispatch (tokens grouped by expert) and variant-batched backbone operations (tokens grouped by
variant) both multiply consecutive row ranges of one input by different matrices. With the matrices
stacked, torch's `_grouped_mm` does that in one call on CPU, which saves the per-matrix Python and
dispatch cost that dominates small models (`moeplex bench serve` measures the effect end to end);
elsewhere, and for matrices that are not stacked, one `linear` per non-empty group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def grouped_matmul_available(device: torch.device) -> bool:
    """Whether a stacked grouped matmul runs as one kernel on device (only CPU is checked against the per-group path)."""
    return device.type == "cpu" and hasattr(torch, "_grouped_mm")


def group_offsets(group_of_row: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Cumulative row counts [num_groups] (int32) of rows sorted by group (group_of_row [T], non-decreasing)."""
    return torch.cumsum(torch.bincount(group_of_row, minlength=num_groups), 0, dtype=torch.int32)


@dataclass
class GroupedWeight:
    """A linear weight that differs by row group: rows offsets[g-1]:offsets[g] use matrices[g] [out, in].

    matrices is a stack [G, out, in] or a list of G matrices; groups may be empty. `moeplex.model.ops.linear`
    accepts it wherever it accepts a plain weight.
    """

    matrices: torch.Tensor | list[torch.Tensor]
    offsets: torch.Tensor  # [G] int32, offsets[-1] == rows of the input
    host_offsets: list[int] | None = None  # the same on the host, when known there (saves a device sync per call)


def grouped_linear(x: torch.Tensor, weight: GroupedWeight) -> torch.Tensor:
    """x [T, in] -> [T, out], each row group times its own matrix."""
    matrices = weight.matrices
    if isinstance(matrices, torch.Tensor) and grouped_matmul_available(x.device):
        transposed = matrices.transpose(1, 2)
        if _kernel_aligned(x) and _kernel_aligned(transposed):
            return torch._grouped_mm(x, transposed, offs=weight.offsets)
    out = x.new_empty(x.shape[0], matrices[0].shape[0])
    start = 0
    for group, end in enumerate(weight.host_offsets or weight.offsets.tolist()):
        if end > start:
            out[start:end] = F.linear(x[start:end], matrices[group])
        start = end
    return out


def _kernel_aligned(t: torch.Tensor) -> bool:
    """`_grouped_mm` needs 16-byte aligned data and strides (every real model's sizes; not every test's)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in t.stride() if stride != 1)
