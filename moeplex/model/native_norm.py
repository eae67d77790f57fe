"""moeplex's RMSNorm for a decode step's few bf16 rows on the CPU (native/rms_norm.c): one call instead of eight torch calls.

At batch 1 torch's composed RMSNorm (cast, square, mean, add, rsqrt, multiply, cast, scale) costs its calls'
overhead, ~40 us per norm on the 2-core EPYC VM, against ~8 us here; a decode step of the bench model runs 17
of them. It keeps transformers' order of roundings; only its sum of squares runs in another order
(`native/rms_norm.c`). Built with the system compiler on first use and cached like moeplex's other kernels;
without a compiler, or with MOEPLEX_NATIVE_NORM=0, `available()` is False and torch's composition runs.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from moeplex.native_build import load_kernel
from moeplex.switch import Switch

SOURCE = Path(__file__).with_name("native") / "rms_norm.c"
SWITCH = Switch("MOEPLEX_NATIVE_NORM")  # 0: torch's composed RMSNorm everywhere
MAX_ELEMENTS = 1 << 17  # rows x hidden up to which one thread here beats torch's calls (64 x 1024 measured: 61 vs 117 us)


def available() -> bool:
    """True when the kernel is built and loaded here (and not switched off)."""
    return SWITCH.on and _library() is not None


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes x [.., H] with weight [H], or x [T, H] with one weight row per token: contiguous bf16
    on the CPU, no more than MAX_ELEMENTS of x."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu" or weight.device.type != "cpu":
        return False
    if x.dim() < 2 or x.shape[-1] == 0 or x.numel() > MAX_ELEMENTS or not x.is_contiguous() or not weight.is_contiguous():
        return False
    return weight.shape == x.shape[-1:] or (x.dim() == 2 and weight.shape == x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`moeplex.model.ops.rms_norm` for x and weight that `fits` takes."""
    library = _library()
    if library is None or not fits(x, weight):
        raise ValueError(f"the native RMSNorm takes contiguous bf16 x [.., H] (at most {MAX_ELEMENTS} values) and weight [H] "
                         f"or [T, H], not x {x.dtype} {tuple(x.shape)}, weight {weight.dtype} {tuple(weight.shape)}")
    hidden = x.shape[-1]
    out = torch.empty_like(x)
    library.moeplex_rms_norm(x.data_ptr(), weight.data_ptr(), hidden if weight.dim() == 2 else 0, x.numel() // hidden, hidden,
                             eps, out.data_ptr())
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = load_kernel(SOURCE, (), "moeplex_rms_norm_supported", "native RMSNorm", "torch's composed RMSNorm is used")
    if library is None:
        return None
    library.moeplex_rms_norm.restype = None
    library.moeplex_rms_norm.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
    ]
    return library
