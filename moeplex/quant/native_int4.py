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
KERNEL_IO = (torch.float32, torch.bfloat16)  # dtypes the kernel reads and writes as they are
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
    """x [M, K] @ W.T -> [M, N] for W in `pack`'s layout: bf16 in, bf16 out; any other float dtype in, float32 out.

    The kernel reads and writes bf16 itself (`KERNEL_IO`), so a bf16 caller pays no casts.
    """
    library = _library()  # a matrix packed for this kernel can still be multiplied while SWITCH is off
    if library is None:
        raise NativeKernelError("the native int4 kernel is not available on this machine")
    io = x.dtype if x.dtype in KERNEL_IO else torch.float32
    x = x.to(io).contiguous()
    rows = packed.shape[0]
    out = torch.empty(x.shape[0], rows, dtype=io)
    bf16 = int(io == torch.bfloat16)
    status = library.moeplex_int4_matmul(
        x.data_ptr(), bf16, x.shape[0], x.shape[1], packed.data_ptr(), scales_and_zeros.data_ptr(),
        rows, group_size, out.data_ptr(), bf16, torch.get_num_threads(), int(AVX512_SWITCH.on),
    )
    if status != 0:
        raise NativeKernelError(f"the native int4 kernel refused x {tuple(x.shape)}, weight [{rows}, "
                                f"{packed.shape[1] * 2}], group size {group_size}")
    return out


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, gate_up_scales: torch.Tensor, down: torch.Tensor, down_scales: torch.Tensor,
           group_size: int) -> torch.Tensor:
    """One SwiGLU expert in one call: x [M, H] bf16 -> down(silu(gate) * up) [M, H] bf16, gate_up [2I, H] and down [H, I] in `pack`'s layout.

    The same roundings as `matmul` composed with torch's silu and product in bf16 (up to silu's last bit).
    """
    library = _library()
    if library is None:
        raise NativeKernelError("the native int4 kernel is not available on this machine")
    hidden, inter = down.shape[0], gate_up.shape[0] // 2
    fits = x.dtype == torch.bfloat16 and x.dim() == 2 and x.shape[1] == hidden == gate_up.shape[1] * 2 and down.shape[1] * 2 == inter
    status = -1
    if fits:
        x = x.contiguous()
        out = torch.empty(x.shape[0], hidden, dtype=torch.bfloat16)
        status = library.moeplex_int4_swiglu(
            x.data_ptr(), x.shape[0], hidden, inter, gate_up.data_ptr(), gate_up_scales.data_ptr(), down.data_ptr(),
            down_scales.data_ptr(), group_size, out.data_ptr(), torch.get_num_threads(), int(AVX512_SWITCH.on),
        )
    if status != 0:
        raise NativeKernelError(f"the native SwiGLU expert takes bf16 x [M, H] with gate_up [2I, H] and down [H, I], not x "
                                f"{x.dtype} {tuple(x.shape)}, gate_up [{2 * inter}, {gate_up.shape[1] * 2}], down [{hidden}, "
                                f"{down.shape[1] * 2}], group size {group_size}")
    return out


def swiglu_mixture(x: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                   weights: list[float], group_size: int) -> torch.Tensor:
    """One token x [1, H] bf16 through several SwiGLU experts, each (gate_up, gate_up_scales, down, down_scales) as for
    `swiglu`: sum over experts of weight * output [1, H] bf16, rounded as torch's bf16 mul_ and add_ of each output in turn."""
    library = _library()
    if library is None:
        raise NativeKernelError("the native int4 kernel is not available on this machine")
    if not experts or len(experts) != len(weights) or x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] != 1:
        raise NativeKernelError(f"the native expert mixture takes one bf16 token and a weight per expert, not x {x.dtype} "
                                f"{tuple(x.shape)} with {len(experts)} experts and {len(weights)} weights")
    hidden, inter = experts[0][2].shape[0], experts[0][0].shape[0] // 2
    if any(t.shape != e.shape for expert in experts for t, e in zip(expert, experts[0])) or x.shape[1] != hidden:
        raise NativeKernelError(f"the experts of a native mixture share one shape, and x [1, {x.shape[1]}] must match it")
    x = x.contiguous()
    out = torch.empty(1, hidden, dtype=torch.bfloat16)
    pointers = [(ctypes.c_void_p * len(experts))(*(expert[i].data_ptr() for expert in experts)) for i in range(4)]
    status = library.moeplex_int4_swiglu_mixture(
        x.data_ptr(), hidden, inter, len(experts), *pointers, (ctypes.c_float * len(weights))(*weights), group_size,
        out.data_ptr(), torch.get_num_threads(), int(AVX512_SWITCH.on),
    )
    if status != 0:
        raise NativeKernelError(f"the native expert mixture refused x {tuple(x.shape)} with experts gate_up "
                                f"[{2 * inter}, {hidden}], down [{hidden}, {inter}], group size {group_size}")
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = load_kernel(SOURCE, ("-fopenmp",), "moeplex_int4_supported", "native int4 kernel", "int4 uses torch's kernel")
    if library is None:
        return None
    library.moeplex_int4_matmul.restype = ctypes.c_int
    library.moeplex_int4_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
    ]
    library.moeplex_int4_swiglu.restype = ctypes.c_int
    library.moeplex_int4_swiglu.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
    ]
    library.moeplex_int4_swiglu_mixture.restype = ctypes.c_int
    library.moeplex_int4_swiglu_mixture.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
    ]
    library.moeplex_int4_runs_avx512.restype = ctypes.c_int
    library.moeplex_int4_runs_avx512.argtypes = [ctypes.c_int64]
    return library


def runs_avx512(group_size: int) -> bool:
    """Whether `matmul` takes the kernel's AVX-512 path for this group size: AVX512-BW, VL and VNNI here, groups of 64 or 128, switched on."""
    library = _library()
    return library is not None and AVX512_SWITCH.on and bool(library.moeplex_int4_runs_avx512(group_size))
