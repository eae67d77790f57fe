"""When a bf16 matmul on the CPU is faster done in fp32: x86 CPUs without bf16 instructions, and enough rows.

On x86 CPUs without AVX512-BF16 or AMX (the AMD EPYC VM of docs/benchmarks.md, AVX2 only) torch emulates
bf16 matrix products, at a cost proportional to rows x weights. Converting the weight to fp32 and
running an fp32 matmul costs about the weight's size once instead. Both sum products of bf16 values in
fp32 and round the result to bf16 once, so the answer is the same up to the order of the sums. The
conversion of a large weight spills out of the caches, so the break-even row count grows with the
weight. This rule comes from `[M, K] x [N, K]` timings on that machine: 4 rows for up to 512K weights,
then one more row per 128K weights (e.g. 32 rows for [4096, 1024]). One row always stays in bf16:
decoding a batch of one streams the weight once, and bf16 reads half the bytes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import torch

MIN_ROWS = 4
WEIGHTS_PER_ROW = 128 * 1024
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
DISABLE_VARIABLE = "MOEPLEX_BF16_UPCAST"  # 0: never upcast

_turned_off = False


@contextlib.contextmanager
def turned_off():
    """Within the block, bf16 matmuls stay in bf16 (for benchmarks that compare the two)."""
    global _turned_off
    previous, _turned_off = _turned_off, True
    try:
        yield
    finally:
        _turned_off = previous


@functools.cache
def bf16_matmul_is_emulated() -> bool:
    """True on an x86-64 Linux CPU whose flags have neither AVX512-BF16 nor AMX-BF16 (and upcasting is not turned off)."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), None)
    except OSError:
        return False
    return flags is not None and not NATIVE_BF16_FLAGS & set(flags)


def upcast_pays(x: torch.Tensor, rows_per_matrix: float, weights_per_matrix: int) -> bool:
    """Whether multiplying x's rows by bf16 matrices of this size (rows_per_matrix rows each, on average)
    is faster with both in fp32 on this machine."""
    if _turned_off or x.dtype != torch.bfloat16 or x.device.type != "cpu" or not bf16_matmul_is_emulated():
        return False
    return rows_per_matrix >= max(MIN_ROWS, weights_per_matrix // WEIGHTS_PER_ROW)
