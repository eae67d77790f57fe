"""When bf16 work on the CPU is faster done in fp32: x86 CPUs without bf16 instructions, prefill-sized matmuls and decode attention.

On x86 CPUs without AVX512-BF16 or AMX (the AMD EPYC VM of docs/benchmarks.md, AVX2 only) torch emulates
bf16 matrix products, at a cost proportional to rows x weights. Converting the weight to fp32 and
running an fp32 matmul costs about the weight's size once instead. Both sum products of bf16 values in
fp32 and round the result to bf16 once, so the answer is the same up to the order of the sums.

The rule: 64 rows or more, and one more row per 128K weights beyond 8M (a large weight's fp32 copy
spills out of the caches). Below that the conversions cost more than they save: `moeplex bench serve`
on the EPYC VM ran at half the throughput when decode batches of 8 were upcast (an earlier rule, from
4 rows). So decode steps stay in bf16 and prefill chunks go to fp32.

Attention is the other way round (`attention_upcast_pays`): torch's bf16 attention for one query per sequence
(a decode step) took 1.1-4.9x the time of casting q, keys and values to fp32 and attending there, on the
EPYC VM with 2 threads, for 8-32 query heads of 64 or 128 dims over 16-1024 keys; with 32-dim heads only
from 1024 keys (2.1x). Chunks of many queries (prefill) were faster in bf16 (0.6-0.9x), so they stay.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from moeplex.cpu_features import cpu_flags
from moeplex.switch import Switch

MIN_ROWS = 64
WEIGHTS_PER_ROW = 128 * 1024
ATTENTION_MIN_HEAD_DIM = 64  # one query: attention in fp32 from this head size at any length ...
ATTENTION_MIN_KEYS = 1024  # ... and with smaller heads from this many keys
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
SWITCH = Switch("MOEPLEX_BF16_UPCAST")  # 0: never upcast; SWITCH.turned_off(): not within a block

_assumed_emulated = False


@contextlib.contextmanager
def assumed_emulated(assume: bool = True):
    """Within the block, upcast as on a CPU that emulates bf16 even where this one does not (benchmarks only:
    with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 set, a newer x86 CPU then runs like an AVX2-only one)."""
    global _assumed_emulated
    previous, _assumed_emulated = _assumed_emulated, assume or _assumed_emulated
    try:
        yield
    finally:
        _assumed_emulated = previous


@functools.cache  # asked on every matmul of a step (via upcast_pays, max_padding, mv_pays)
def bf16_matmul_is_emulated() -> bool:
    """True on an x86-64 Linux CPU whose flags have neither AVX512-BF16 nor AMX-BF16."""
    flags = cpu_flags()
    return bool(flags) and not NATIVE_BF16_FLAGS & flags


def upcast_pays(x: torch.Tensor, rows_per_matrix: float, weights_per_matrix: int) -> bool:
    """Whether multiplying x's rows by bf16 matrices of this size (rows_per_matrix rows each, on average)
    is faster with both in fp32 on this machine."""
    if not SWITCH.on or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return False
    if not (_assumed_emulated or bf16_matmul_is_emulated()):
        return False
    return rows_per_matrix >= max(MIN_ROWS, weights_per_matrix // WEIGHTS_PER_ROW)


def attention_upcast_pays(q: torch.Tensor, keys: int) -> bool:
    """Whether one sequence's attention, q [heads, queries, head_dim] over `keys` keys, is faster in fp32 on this machine."""
    if not SWITCH.on or q.dtype != torch.bfloat16 or q.device.type != "cpu" or q.shape[-2] != 1:
        return False
    if not (_assumed_emulated or bf16_matmul_is_emulated()):
        return False
    return q.shape[-1] >= ATTENTION_MIN_HEAD_DIM or keys >= ATTENTION_MIN_KEYS
