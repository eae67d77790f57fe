"""moeplex's attention for one decode token of one sequence on the CPU (native/decode_attention.c), in one call.

One call per layer and sequence does what took a decode step's rotary embedding (eight torch calls), its cache write
(two) and SDPA: at batch 1 SDPA alone cost ~65 us per call for the bench model's 16 heads over ~50 keys on the
2-core Zen 4 EPYC VM, the kernel's attention ~19 us. Rotation gives torch's bits; attention runs in float32 from the
exact bf16 values, as the fp32 path of `moeplex.model.attention` does. Up to MAX_KEYS keys. Built with the system
compiler on first use and cached like moeplex's other kernels; without a compiler, or with MOEPLEX_NATIVE_ATTENTION=0,
`available()` is False and the torch path runs.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from moeplex.native_build import load_kernel
from moeplex.switch import Switch

SOURCE = Path(__file__).with_name("native") / "decode_attention.c"
SWITCH = Switch("MOEPLEX_NATIVE_ATTENTION")  # 0: the torch path (rotary, cache write, SDPA) everywhere
MAX_KEYS = 2048  # the most keys timed: 3.9x faster than SDPA there, 2.5-4x at 1-1024 (docs/runtime.md)


def available() -> bool:
    """True when the kernel is built and loaded here (and not switched off)."""
    return SWITCH.on and _library() is not None


def takes_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                      chunks: list, window: int | None) -> bool:
    """Whether `rotate_write_attend` takes every row of a step's q [T, Hq, D], k and v [T, Hkv, D] (cos, sin [T, 1, D]):
    each chunk one token that sees every key (no sliding window shorter than its keys), bf16 on the CPU, rows
    contiguous, the cache's layer [Hkv, capacity, D] contiguous and able to hold the token, at most MAX_KEYS keys."""
    if not available() or any(chunk.num_tokens != 1 for chunk in chunks) or q.shape[0] != len(chunks):
        return False
    longest = max(chunk.start for chunk in chunks) + 1
    if longest > MAX_KEYS or (window is not None and longest > window):
        return False
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in (q, k, v, cos, signed_sin)):
        return False
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    if head_dim % 8 or kv_heads == 0 or heads % kv_heads or v.shape != k.shape or k.shape[2] != head_dim:
        return False
    if any(t.stride(2) != 1 or t.stride(1) != head_dim for t in (q, k, v)) or not (cos.is_contiguous() and signed_sin.is_contiguous()):
        return False
    return all(chunk.cache.keys.dtype == torch.bfloat16 and chunk.cache.keys.is_contiguous() and chunk.cache.values.is_contiguous()
               and chunk.start < chunk.cache.capacity for chunk in chunks)


def rotate_write_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                        cache, layer: int, position: int, out: torch.Tensor) -> None:
    """One decode token's attention after its projections, into out [Hq, D]: q [Hq, D], k and v [Hkv, D] rotated by cos /
    signed_sin [1, D] as `moeplex.model.rope.apply_rotary` does (the same bits), k and v written at `position` of the
    cache's layer (a SequenceKVCache), then softmax(q k^T / sqrt(D)) v over its positions 0..position in float32, rounded
    to bf16. For a step that `takes_decode_step`."""
    library = _library()
    keys, values = cache.keys[layer], cache.values[layer]  # [Hkv, capacity, D], contiguous
    heads, head_dim = q.shape
    status = library.moeplex_rotate_write_attend(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), keys.data_ptr(), values.data_ptr(),
        keys.stride(0), position, heads, k.shape[0], head_dim, head_dim**-0.5, out.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"the native decode attention refused q {tuple(q.shape)}, k {tuple(k.shape)} at position {position} "
                         f"of a cache of {cache.capacity} (or could not allocate its buffers)")


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = load_kernel(SOURCE, (), "moeplex_decode_attention_supported", "native decode attention", "the torch path (rotary, SDPA) is used")
    if library is None:
        return None
    library.moeplex_rotate_write_attend.restype = ctypes.c_int
    library.moeplex_rotate_write_attend.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_void_p]
    return library
