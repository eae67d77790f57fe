"""Grouped matmuls: rows of a flat batch, sorted into groups, each group times its own matrix.

Expert dispatch (tokens grouped by expert) and variant-batched backbone operations (tokens grouped by
variant) both multiply consecutive row ranges of one input by different matrices. With the matrices
stacked, one call does it, which saves the per-matrix Python and dispatch cost that dominates small
models (`moeplex bench serve` measures the effect end to end): a batched matmul over the groups padded to
one row count when they are about equally long (`PaddedRows`; decoding a uniform mix of variants), else
torch's `_grouped_mm` on CPU; elsewhere, and for matrices that are not stacked, one `linear` per group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.cpu_features import has_amx_bf16
from moeplex.model import native_gemv
from moeplex.model.bf16_upcast import bf16_matmul_is_emulated, upcast_pays


def grouped_matmul_available(device: torch.device) -> bool:
    """Whether a stacked grouped matmul runs as one kernel on device (only CPU is checked against the per-group path)."""
    return device.type == "cpu" and hasattr(torch, "_grouped_mm")


def group_offsets(group_of_row: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Cumulative row counts [num_groups] (int32) of rows sorted by group (group_of_row [T], non-decreasing)."""
    return torch.cumsum(torch.bincount(group_of_row, minlength=num_groups), 0, dtype=torch.int32)


# How many padded rows per real row a batched matmul may compute before `_grouped_mm` is the faster call.
# Timed on the 2-core AVX2 VM (4 groups, 128-4096 x 128-256 matrices): in fp32 the batched matmul beat
# `_grouped_mm` even at 1.5 padded rows per row; in bf16, which that CPU emulates, the two were equal
# without padding and the batched one lost beyond that. Where bf16 runs natively (oneDNN), each matmul
# call costs enough that one padded batch of up to 4x the rows beats a call per group (the engine step
# ratio of `moeplex bench serve` on the 2-core Xeon of docs/benchmarks.md, with 4.0 against 1.0).
FP32_MAX_PADDING = 2.0
NATIVE_BF16_MAX_PADDING = 4.0
DEFAULT_MAX_PADDING = 1.0  # bf16 that the CPU emulates, and every dtype not measured (CUDA among them)


def max_padding(x: torch.Tensor) -> float:
    """Padded rows per real row up to which the padded batch of x's rows runs instead of `_grouped_mm`."""
    if x.dtype == torch.float32:
        return FP32_MAX_PADDING
    return NATIVE_BF16_MAX_PADDING if runs_native_cpu_bf16(x) else DEFAULT_MAX_PADDING


def runs_native_cpu_bf16(x: torch.Tensor) -> bool:
    """Whether x is bf16 on a CPU that multiplies bf16 natively (oneDNN on AVX512-BF16 or AMX)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not bf16_matmul_is_emulated()


@dataclass
class PaddedRows:
    """Rows sorted by group, as a batch [groups, rows, ...] over groups first..first+count-1, zero-padded.

    index[t]: the padded row of flat row t (None when no group needs padding); padding: padded rows / rows.
    """

    first: int
    count: int
    rows: int
    index: torch.Tensor | None
    padding: float

    @classmethod
    def of(cls, host_offsets: list[int], device) -> PaddedRows | None:
        """The padded layout of groups ending at host_offsets (cumulative row counts); None without rows."""
        sizes = [end - start for start, end in zip([0, *host_offsets], host_offsets)]
        used = [group for group, size in enumerate(sizes) if size]
        if not used:
            return None
        first, last = used[0], used[-1]
        rows, count = max(sizes), last - first + 1
        padded = rows * count
        index = None
        if padded != host_offsets[-1]:
            index = torch.cat([torch.arange(sizes[g], device=device) + (g - first) * rows for g in range(first, last + 1)])
        return cls(first, count, rows, index, padded / host_offsets[-1])


@dataclass
class GroupedWeight:
    """A linear weight that differs by row group: rows offsets[g-1]:offsets[g] use matrices[g] [out, in].

    matrices is a stack [G, out, in] or a list of G matrices; groups may be empty. `moeplex.model.ops.linear`
    accepts it wherever it accepts a plain weight.
    """

    matrices: torch.Tensor | list[torch.Tensor]
    offsets: torch.Tensor  # [G] int32, offsets[-1] == rows of the input
    host_offsets: list[int] | None = None  # the same on the host, when known there (saves a device sync per call)
    padded: PaddedRows | None = None  # the groups' rows as a padded batch, when the caller laid it out
    group_of_row: torch.Tensor | None = None  # [T] int64: the group of each row, when the caller knows it


def grouped_linear(x: torch.Tensor, weight: GroupedWeight) -> torch.Tensor:
    """x [T, in] -> [T, out], each row group times its own matrix (in fp32 where `bf16_upcast` says it pays)."""
    matrices = weight.matrices
    if (isinstance(matrices, torch.Tensor) and weight.group_of_row is not None
            and native_gemv_pays(x, matrices, rows_per_matrix=_largest_group(weight))):
        return native_gemv.gathered_gemv(x, matrices, weight.group_of_row)
    if isinstance(matrices, torch.Tensor) and upcast_pays(x, x.shape[0] / matrices.shape[0], matrices[0].numel()):
        return grouped_linear(x.float(), dataclasses.replace(weight, matrices=matrices.float())).to(x.dtype)
    padded = weight.padded
    if isinstance(matrices, torch.Tensor) and padded is not None and padded.padding <= max_padding(x):
        return padded_linear(x, matrices, padded)
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


def _largest_group(weight: GroupedWeight) -> int:
    """The most rows any one group of weight has."""
    if weight.padded is not None:
        return weight.padded.rows
    ends = weight.host_offsets or weight.offsets.tolist()
    return max(end - start for start, end in zip([0, *ends], ends))


def padded_linear(x: torch.Tensor, matrices: torch.Tensor, padded: PaddedRows) -> torch.Tensor:
    """x [T, in] -> [T, out] as one batched matmul of the groups' rows (zero-padded to one count) and stacked matrices."""
    used = matrices[padded.first : padded.first + padded.count]  # [G, out, in], a view
    batch = x if padded.index is None else x.new_zeros(padded.count * padded.rows, x.shape[1]).index_copy_(0, padded.index, x)
    if padded.rows == 1 and weight_first_pays(x):  # a batched GEMV: one row per group (zeros for empty groups)
        out = torch.bmm(used, batch.unsqueeze(-1)).squeeze(-1)
    else:
        out = torch.bmm(batch.view(padded.count, padded.rows, -1), used.transpose(1, 2)).flatten(0, 1)
    return out if padded.index is None else out.index_select(0, padded.index)


def weight_first_pays(x: torch.Tensor) -> bool:
    """Whether a batch of one row per matrix runs faster as matrices @ rows than as rows @ matrices.T.

    As for torch.mv against F.linear with one row (`moeplex.model.ops.linear`): on the AMX Xeon of
    docs/benchmarks.md, timing 2-8 groups of the demo models' matrices and of 4096-wide ones, the
    weight-first batch was the faster one almost everywhere, most for wide matrices such as the lm_heads
    of a decode step that mixes variants. On a Zen 4 EPYC (AVX512-BF16, no AMX) it was the slower one: the
    4-variant decode step took 4.87 ms against 4.61 ms rows first (the engine step of `moeplex bench
    serve`). In fp32 it was slower too; CPUs that emulate bf16 were not measured.
    """
    return runs_native_cpu_bf16(x) and has_amx_bf16()


def mv_pays(x: torch.Tensor) -> bool:
    """Whether one row x [1, in] on the CPU is multiplied faster as torch.mv(weight, row) than as F.linear.

    The rule was set on the Sapphire Rapids (AMX) of docs/benchmarks.md, where torch.mv's bf16 GEMV streamed
    weights about twice as fast as F.linear's M=1 path; CPUs that emulate bf16 (the AVX2 EPYC) keep it. On
    a Zen 4 EPYC (AVX512-BF16, no AMX) torch.mv was the slower one: oneDNN's M=1 GEMM streamed 1.3-2x
    faster for 128-4096 x 128-32000 bf16 weights with 1 and 2 threads. In fp32 the two were equal.
    """
    if x.device.type != "cpu":
        return False
    return has_amx_bf16() or not runs_native_cpu_bf16(x)


# When moeplex's native gathered GEMV beats oneDNN's bf16 matmul (docs/benchmarks.md, "The native gathered
# GEMV"). Timed on the 2-core Xeon VM (AMX-BF16, AVX512-BF16) with 1 and 2 threads, 128-4096 x 128-2048
# matrices: with one row it took 0.36-0.56x oneDNN's time at every size. Its cost grows with rows x weights
# while oneDNN's hardly grows with rows, so with more rows on one matrix it won (or tied, within 7%) up to
# 4 rows at every size, and beyond that only while the work stayed small.
NATIVE_GEMV_MAX_ROWS = 16  # rows of one call
NATIVE_GEMV_MAX_ROWS_ANY_SIZE = 4  # rows per matrix at which it won at every size
NATIVE_GEMV_MAX_WORK = 2**19  # rows per matrix x weights per matrix up to which it won beyond that


def native_gemv_pays(x: torch.Tensor, matrices: torch.Tensor, rows: int | None = None, rows_per_matrix: int | None = None) -> bool:
    """Whether rows of x [T, in] times matrices [N, out, in] (or one matrix [out, in]) run faster in `moeplex.model.native_gemv`.

    rows: how many rows the call multiplies (T by default); rows_per_matrix: the most that share one matrix
    (all of them by default).
    """
    rows = x.shape[0] if rows is None else rows
    sharing = rows if rows_per_matrix is None else rows_per_matrix
    small = sharing <= NATIVE_GEMV_MAX_ROWS_ANY_SIZE or sharing * matrices.shape[-1] * matrices.shape[-2] <= NATIVE_GEMV_MAX_WORK
    return rows <= NATIVE_GEMV_MAX_ROWS and small and native_gemv.fits(x, matrices) and native_gemv.available()


def _kernel_aligned(t: torch.Tensor) -> bool:
    """`_grouped_mm` needs 16-byte aligned data and strides (every real model's sizes; not every test's)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in t.stride() if stride != 1)
