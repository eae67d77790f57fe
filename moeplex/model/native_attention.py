"""moeplex's attention for one decode token of one sequence on the CPU (native/decode_attention.c): one call instead of SDPA.

At batch 1 torch's SDPA costs ~65 us per call for the bench model's 16 heads over ~50 keys on the 2-core Zen 4 EPYC
VM, against ~19 us here; a decode step runs one per layer and sequence. It computes in float32 from the exact
bf16 values, as the fp32 path of `moeplex.model.attention` does. Up to MAX_KEYS keys (the most timed); built with the system compiler on first use and cached like moeplex's other kernels;
without a compiler, or with MOEPLEX_NATIVE_ATTENTION=0, `available()` is False and SDPA runs.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from moeplex.native_build import load_kernel
from moeplex.switch import Switch

SOURCE = Path(__file__).with_name("native") / "decode_attention.c"
SWITCH = Switch("MOEPLEX_NATIVE_ATTENTION")  # 0: torch's SDPA everywhere
MAX_KEYS = 2048  # the most keys timed: 3.9x faster than SDPA there, 2.5-4x at 1-1024 (docs/benchmarks.md)


def available() -> bool:
    """True when the kernel is built and loaded here (and not switched off)."""
    return SWITCH.on and _library() is not None


def fits(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernel takes q [Hq, 1, D] over keys and values [Hkv, L, D]: bf16 on the CPU, Hq a multiple of Hkv,
    1 <= L <= MAX_KEYS, D a multiple of 8, q contiguous, rows of keys and values contiguous with one stride between kv heads."""
    tensors = (q, keys, values)
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != 3 for t in tensors):
        return False
    heads, queries, head_dim = q.shape
    kv_heads, length, _ = keys.shape
    if queries != 1 or values.shape != keys.shape or keys.shape[2] != head_dim or head_dim % 8 or not 1 <= length <= MAX_KEYS:
        return False
    if kv_heads == 0 or heads % kv_heads or not q.is_contiguous():
        return False
    return all(t.stride(2) == 1 and t.stride(1) == head_dim for t in (keys, values)) and keys.stride(0) == values.stride(0)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [Hq, 1, D] over every key of keys, values [Hkv, L, D] (grouped-query
    attention: Hq / Hkv query heads per kv head) -> [Hq, 1, D] bf16, for tensors that `fits` takes."""
    library = _library()
    if library is None or not fits(q, keys, values):
        raise ValueError(f"the native decode attention takes bf16 q [Hq, 1, D] and keys, values [Hkv, L, D] with Hq a "
                         f"multiple of Hkv, 1 <= L <= {MAX_KEYS} and rows contiguous, not q {q.dtype} {tuple(q.shape)}, "
                         f"keys {keys.dtype} {tuple(keys.shape)}, values {values.dtype} {tuple(values.shape)}")
    heads, _, head_dim = q.shape
    kv_heads, length, _ = keys.shape
    out = torch.empty_like(q)
    status = library.moeplex_decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), heads, kv_heads, length,
                                              head_dim, keys.stride(0), head_dim**-0.5, out.data_ptr())
    if status != 0:
        raise MemoryError("the native decode attention could not allocate its buffers")
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = load_kernel(SOURCE, (), "moeplex_decode_attention_supported", "native decode attention", "torch's SDPA is used")
    if library is None:
        return None
    library.moeplex_decode_attention.restype = ctypes.c_int
    library.moeplex_decode_attention.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
    ]
    return library
