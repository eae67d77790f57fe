"""moeplex's own CPU int4 kernel (native/int4_matmul.c): built with the system C compiler on first use, loaded with ctypes.

torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) unpacks at 2-3 GB/s of packed weights on an AVX2
machine, slower than torch's own bf16 GEMV streams the four times larger bf16 matrix, so int4 barely
paid there (docs/quantization.md). This kernel widens each 32-channel block once to 16-bit lanes and
multiplies it into up to four activation rows (in 16-bit fixed point per group) with integer
multiply-adds; with AVX512-BW, VL and VNNI and groups of 64 or 128 it takes a 512-bit path with `vpdpwssd`
(`runs_avx512`; MOEPLEX_NATIVE_INT4_AVX512=0 keeps the AVX2 one). It needs x86-64 with AVX2 and FMA and a C
compiler; where either is missing, or MOEPLEX_NATIVE_INT4=0, `available()` is False and int4 uses torch's
kernel. Where torch runs its AVX-512 kernels on a CPU with AMX its own int4 kernel beats this one's AVX2 path
(not its AVX-512 path), and int4 uses torch's there wherever only the AVX2 path would run
(`moeplex.quant.kernels.uses_native_int4`). The shared object is cached under $MOEPLEX_CACHE/native, keyed by the source and the compiler.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch  # imported before the kernel loads, so the kernel's libgomp is torch's (same soname)

from moeplex.native_build import load_kernel
from moeplex.switch import Switch

SOURCE = Path(__file__).with_name("native") / "int4_matmul.c"
BLOCK = 32  # input channels per packed block (16 bytes)
SWITCH = Switch("MOEPLEX_NATIVE_INT4")  # 0: int4 uses torch's kernel; SWITCH.turned_off(): packs for it within a block
AVX512_SWITCH = Switch("MOEPLEX_NATIVE_INT4_AVX512")  # 0: the kernel keeps its AVX2 path on AVX-512 CPUs too


class NativeKernelError(RuntimeError):
    """The native kernel refused its arguments."""


def available() -> bool:
    """True when the native kernel is built and loaded for this machine (and not switched off)."""
    return SWITCH.on and _library() is not None


def pack(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, K] in 0..15 and scales_and_zeros [K/group, N, 2] bf16 -> (packed [N, K/2] uint8, [N, K/group, 2] bf16)."""
    rows, in_features = q.shape
    if in_features % BLOCK:
        raise ValueError(f"the native int4 kernel needs a multiple of {BLOCK} input channels, not {in_features}")
    blocks = q.to(torch.uint8).reshape(rows, in_features // BLOCK, 2, BLOCK // 2)  # channel i and 16 + i share byte i
    packed = (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(rows, in_features // 2).contiguous()
    return packed, scales_and_zeros.transpose(0, 1).contiguous()


def matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) @ W.T -> [M, N] float32, for W in `pack`'s layout."""
    library = _library()  # a matrix packed for this kernel can still be multiplied while SWITCH is off
    if library is None:
        raise NativeKernelError("the native int4 kernel is not available on this machine")
    x = x.float().contiguous()
    rows = packed.shape[0]
    out = torch.empty(x.shape[0], rows, dtype=torch.float32)
    status = library.moeplex_int4_matmul(
        x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(), scales_and_zeros.data_ptr(),
        rows, group_size, out.data_ptr(), torch.get_num_threads(), int(AVX512_SWITCH.on),
    )
    if status != 0:
        raise NativeKernelError(f"the native int4 kernel refused x {tuple(x.shape)}, weight [{rows}, "
                                f"{packed.shape[1] * 2}], group size {group_size}")
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = load_kernel(SOURCE, ("-fopenmp",), "moeplex_int4_supported", "native int4 kernel", "int4 uses torch's kernel")
    if library is None:
        return None
    library.moeplex_int4_matmul.restype = ctypes.c_int
    library.moeplex_int4_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
    ]
    library.moeplex_int4_runs_avx512.restype = ctypes.c_int
    library.moeplex_int4_runs_avx512.argtypes = [ctypes.c_int64]
    return library


def runs_avx512(group_size: int) -> bool:
    """Whether `matmul` takes the kernel's AVX-512 path for this group size: AVX512-BW, VL and VNNI here, groups of 64 or 128, switched on."""
    library = _library()
    return library is not None and AVX512_SWITCH.on and bool(library.moeplex_int4_runs_avx512(group_size))
