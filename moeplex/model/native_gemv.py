"""moeplex's gathered bf16 GEMV (native/gathered_gemv.c): a few rows, each times its own matrix of a stack, in place.

A decode step multiplies a few token rows by small matrices: one per variant for the backbone of a
mixed batch, one per token and choice for the experts. oneDNN's bf16 matmul costs ~20 us per call
however small, and the batched forms that make one call of many (a padded `bmm`, gathered expert
copies) copy or pad first; this kernel reads each row's matrix where it lies. It needs x86-64 with
AVX512-BF16 (Sapphire Rapids, Zen 4 and later; timed on the Xeon VM only) and a C compiler; it is built on first use and cached
like the native int4 kernel. Where either is missing, or MOEPLEX_NATIVE_GEMV=0, `available()` is False
and the runtime keeps torch's paths. Which calls it takes: `moeplex.model.grouped.native_gemv_pays`.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch  # imported before the kernel loads, so the kernel's libgomp is torch's (same soname)

from moeplex.native_build import load_kernel
from moeplex.switch import Switch

SOURCE = Path(__file__).with_name("native") / "gathered_gemv.c"
INPUTS_PER_STEP = 32  # the kernel's input length must be a multiple of this
SWITCH = Switch("MOEPLEX_NATIVE_GEMV")  # 0: torch's matmuls everywhere; SWITCH.turned_off() for a block


class NativeGemvError(RuntimeError):
    """The native kernel refused its arguments."""


def available() -> bool:
    """True when the kernel is built and loaded for this machine (and not switched off)."""
    return SWITCH.on and _library() is not None


def stack_fits(matrices: torch.Tensor) -> bool:
    """Whether the kernel takes this stack [N, out, K] (or one matrix [out, K]): contiguous bf16 on the CPU, K a multiple of 32."""
    return (matrices.dtype == torch.bfloat16 and matrices.device.type == "cpu" and matrices.is_contiguous()
            and matrices.shape[-1] % INPUTS_PER_STEP == 0)


def fits(x: torch.Tensor, matrices: torch.Tensor) -> bool:
    """Whether the kernel takes rows x [T, K] times this stack: `stack_fits`, and x of its dtype, device and width K."""
    return (x.dim() == 2 and x.dtype == matrices.dtype and x.device == matrices.device and x.shape[-1] == matrices.shape[-1]
            and stack_fits(matrices))


def gathered_gemv(x: torch.Tensor, matrices: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """x [R, K] bf16, matrices [N, out, K] bf16 (contiguous), index [R] int64 -> [R, out]: row r times matrices[index[r]].T.

    Sums in float32; out_dtype is float32 or bf16 (rounded to nearest even).
    """
    library = _library()
    if library is None:
        raise NativeGemvError("the native gathered GEMV is not available on this machine")
    if not fits(x, matrices) or matrices.dim() != 3 or x.dim() != 2 or index.shape != (x.shape[0],):
        raise NativeGemvError(f"the native gathered GEMV takes x [R, K] and a contiguous stack [N, out, K] in bf16 with K a "
                              f"multiple of {INPUTS_PER_STEP} and index [R], not x {tuple(x.shape)} {x.dtype}, "
                              f"matrices {tuple(matrices.shape)} {matrices.dtype}, index {tuple(index.shape)}")
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise NativeGemvError(f"the native gathered GEMV writes float32 or bf16, not {out_dtype}")
    return _multiply(library, x, matrices, index.to(torch.int64).contiguous(), out_dtype)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [R, K] @ weight[out, K].T -> [R, out] bf16, for x and weight that `fits` takes (as
    `moeplex.model.grouped.native_gemv_pays` has checked): `gathered_gemv` with one matrix, without its argument
    checks and index, which cost about as much as the kernel's call for a decode step's small projections."""
    rows = x.shape[0]
    zeros = _ZERO_INDEX if rows <= _ZERO_INDEX.shape[0] else torch.zeros(rows, dtype=torch.int64)
    return _multiply(_library(), x, weight, zeros, torch.bfloat16)


_ZERO_INDEX = torch.zeros(64, dtype=torch.int64)  # every row's matrix in `gemv` (never written)


def _multiply(library: ctypes.CDLL, x: torch.Tensor, matrices: torch.Tensor, index: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel's call for rows x [R, K], a contiguous stack [N, out, K] (or one matrix [out, K]) and index [R] int64
    (contiguous)."""
    x = x.contiguous()
    count = matrices.shape[0] if matrices.dim() == 3 else 1
    out = torch.empty(x.shape[0], matrices.shape[-2], dtype=out_dtype)
    status = library.moeplex_gathered_gemv(x.data_ptr(), matrices.data_ptr(), count, index.data_ptr(), out.data_ptr(),
                                           x.shape[0], matrices.shape[-2], matrices.shape[-1], int(out_dtype == torch.bfloat16),
                                           torch.get_num_threads())
    if status == 2:
        raise NativeGemvError(f"the native gathered GEMV got an index outside 0..{count - 1}")
    if status != 0:
        raise NativeGemvError(f"the native gathered GEMV refused x {tuple(x.shape)}, matrices {tuple(matrices.shape)}")
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = load_kernel(SOURCE, ("-fopenmp",), "moeplex_gathered_gemv_supported", "native gathered GEMV", "torch's matmuls are used")
    if library is None:
        return None
    library.moeplex_gathered_gemv.restype = ctypes.c_int
    library.moeplex_gathered_gemv.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
    ]
    return library
