"""The torch kernels behind quantized matmuls, with the CPU/CUDA differences kept in this one place.

int8: `torch._weight_int8pack_mm` (CPU and CUDA). int4: torch's tinygemm format, packed and multiplied by
`_convert_weight_to_int4pack_for_cpu` / `_weight_int4pack_mm_for_cpu` on CPU and by
`_convert_weight_to_int4pack` / `_weight_int4pack_mm` on CUDA. Every kernel takes bf16 activations: on
this CPU their fp32 paths are 10-20x slower, and the CUDA int4 kernel has none.
"""

from __future__ import annotations

import torch

KERNEL_DTYPE = torch.bfloat16
INT4_INNER_K_TILES = 8  # tinygemm layout parameter; 2, 4 and 8 measured equal on CPU (docs/quantization.md)


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ (qweight [N, K] int8 * scales [N] bf16).T -> [M, N] bf16."""
    return torch._weight_int8pack_mm(x, qweight, scales)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values q [N, K] (0..15, any integer dtype) -> the device's tinygemm tensor."""
    if q.device.type == "cuda":
        two_per_byte = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2]
        return torch._convert_weight_to_int4pack(two_per_byte, cuda_inner_k_tiles(q.shape[1]))
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), INT4_INNER_K_TILES)  # [N, K/2] uint8


def cuda_inner_k_tiles(in_features: int) -> int:
    """The CUDA layout's tiles of 16 input channels per inner step: it needs K to be a multiple of 16 x tiles."""
    for tiles in (INT4_INNER_K_TILES, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"CUDA int4 needs a multiple of 32 input channels, not {in_features}")


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 @ dequantized(packed).T -> [M, N] bf16; scales_and_zeros [K/group_size, N, 2] bf16."""
    if x.device.type == "cuda":
        return torch._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
