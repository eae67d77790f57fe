"""The kernels behind quantized matmuls, with the CPU/CUDA differences kept in this one place.

int8: `torch._weight_int8pack_mm` (CPU and CUDA). int4, one of three kernels, chosen when a matrix is
packed for its device: "native" (moeplex's own kernel, `native_int4`, on x86-64 CPUs where it builds,
except where it would run only its AVX2 path while torch runs its AVX-512 code on a CPU with AMX:
`uses_native_int4`), else torch's tinygemm format, packed and
multiplied by `_convert_weight_to_int4pack_for_cpu` / `_weight_int4pack_mm_for_cpu` on CPU
("cpu-tinygemm") and by `_convert_weight_to_int4pack` / `_weight_int4pack_mm` on CUDA ("cuda-tinygemm").
torch's kernels take bf16 activations: on this CPU their fp32 paths are 10-20x slower, and the CUDA int4
kernel has none. The native kernel takes any float activations and returns fp32.
"""

from __future__ import annotations

import contextlib

import torch

from moeplex.cpu_features import has_amx_bf16
from moeplex.quant import native_int4
from moeplex.quant.formats import DEFAULT_GROUP_SIZE

KERNEL_DTYPE = torch.bfloat16
INT4_INNER_K_TILES = 8  # tinygemm layout parameter; 2, 4 and 8 measured equal on CPU (docs/quantization.md)

_native_forced = False


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ (qweight [N, K] int8 * scales [N] bf16).T -> [M, N] bf16."""
    return torch._weight_int8pack_mm(x, qweight, scales)


def int4_pack(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Unsigned 4-bit values q [N, K] (0..15, any integer dtype) and scales_and_zeros [K/group, N, 2] bf16
    -> (kernel name, packed weight, scales and zeros) in the layout of the kernel for q's device."""
    if q.device.type == "cuda":
        two_per_byte = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2]
        return "cuda-tinygemm", torch._convert_weight_to_int4pack(two_per_byte, cuda_inner_k_tiles(q.shape[1])), scales_and_zeros
    if uses_native_int4(q.shape[1] // scales_and_zeros.shape[0]):
        return ("native", *native_int4.pack(q, scales_and_zeros))
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), INT4_INNER_K_TILES)  # [N, K/2] uint8
    return "cpu-tinygemm", packed, scales_and_zeros


def uses_native_int4(group_size: int = DEFAULT_GROUP_SIZE) -> bool:
    """Whether int4 matrices of this group size are packed for moeplex's native kernel: it is built here, and it
    runs its AVX-512 path or torch's CPU kernel does not run its AVX-512 code on a CPU with AMX (or
    `native_int4_forced` is in force).

    Which one is faster depends on the CPU and the path (`moeplex bench quant`, docs/quantization.md): on the
    AVX2 EPYC VM torch's kernel unpacked at 2-3 GB/s and the native one was the faster; on the 2-core Xeon
    (AVX-512 and AMX) torch's beat the native AVX2 path (97 against 66 tokens/s) but not its AVX-512 path with
    prefetching (119 against 131-133 tokens/s); on a Zen 4 EPYC (AVX-512, no AMX) the native AVX2 path was faster,
    by less (98 against 89 and 91 against 88 tokens/s).
    """
    if not native_int4.available():
        return False
    return _native_forced or native_int4.runs_avx512(group_size) or not (torch_runs_avx512() and has_amx_bf16())


def int4_kernel_name(group_size: int) -> str:
    """Which CPU kernel (and path) int4 matmuls of this group size run here: "native-avx512", "native" or "torch"."""
    if not uses_native_int4(group_size):
        return "torch"
    return "native-avx512" if native_int4.runs_avx512(group_size) else "native"


def torch_runs_avx512() -> bool:
    """Whether torch runs its AVX-512 kernels here (`ATEN_CPU_CAPABILITY` can lower that)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@contextlib.contextmanager
def native_int4_forced():
    """Within the block, int4 matrices are packed for the native kernel wherever it is built (benchmarks compare both)."""
    global _native_forced
    previous, _native_forced = _native_forced, True
    try:
        yield
    finally:
        _native_forced = previous


def cuda_inner_k_tiles(in_features: int) -> int:
    """The CUDA layout's tiles of 16 input channels per inner step: it needs K to be a multiple of 16 x tiles."""
    for tiles in (INT4_INNER_K_TILES, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"CUDA int4 needs a multiple of 32 input channels, not {in_features}")


def int4_mm(x: torch.Tensor, kernel: str, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dequantized(packed).T -> [M, N], by the kernel that `int4_pack` chose (bf16 out of torch's; native: bf16 for bf16 x, else fp32)."""
    if kernel == "native":
        return native_int4.matmul(x, packed, group_size, scales_and_zeros)
    if kernel == "cuda-tinygemm":
        return torch._weight_int4pack_mm(x.to(KERNEL_DTYPE), packed, group_size, scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), packed, group_size, scales_and_zeros)
