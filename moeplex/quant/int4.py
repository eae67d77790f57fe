"""int4 weight-only format: asymmetric (min/max) per group of `group_size` input channels, packed for a kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplex.quant.formats import DEFAULT_GROUP_SIZE, GROUP_SIZES
from moeplex.quant import native_int4
from moeplex.quant.kernels import KERNEL_DTYPE, int4_mm, int4_pack

INT4_LEVELS = 15  # values 0..15
INT4_OFFSET = 8  # the kernel dequantizes q to (q - 8) * scale + zero


@dataclass
class Int4Weight:
    """A [N, K] matrix as packed 4-bit values with a scale and zero per (group of K, row)."""

    kernel: str  # which kernel's layout `packed` is in (moeplex.quant.kernels.int4_pack)
    packed: torch.Tensor  # on CPU [N, K/2] uint8
    scales_and_zeros: torch.Tensor  # bf16 (scale, zero) pairs: [K/group_size, N, 2], or [N, K/group_size, 2] for "native"
    group_size: int
    in_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W.T -> [M, N], in x's dtype."""
        out = int4_mm(x, self.kernel, self.packed, self.group_size, self.scales_and_zeros)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The matrix the kernel multiplies by, [N, K] float32 (read back through the kernel itself)."""
        eye = torch.eye(self.in_features, device=self.packed.device)  # [K, K] float32: the native kernel then writes float32
        return self.matmul(eye).float().T

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    @classmethod
    def from_codes(cls, q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> Int4Weight:
        """From unpacked values q [N, K] (0..15) and scales_and_zeros [K/group_size, N, 2], packed for q's device."""
        return cls(*int4_pack(q, scales_and_zeros), group_size, q.shape[1])


def native_swiglu(x: torch.Tensor, gate_up: Int4Weight, down: Int4Weight) -> torch.Tensor | None:
    """silu(x W_gate) * (x W_up) W_down in one native call (`native_int4.swiglu`) where it runs: bf16 rows on the CPU and
    both matrices packed for the native kernel with one group size; else None (the caller composes the matmuls)."""
    if not _runs_native_swiglu(x, [(gate_up, down)]):
        return None
    return native_int4.swiglu(x, *_native_operands(gate_up, down), gate_up.group_size)


def native_swiglu_mixture(x: torch.Tensor, experts: list[tuple[Int4Weight, Int4Weight]], weights: list[float]) -> torch.Tensor | None:
    """One token x [1, H] through several experts (gate_up, down), outputs weighted and summed, in one native call
    (`native_int4.swiglu_mixture`) where each expert runs as `native_swiglu` with one group size; else None."""
    if x.shape[0] != 1 or not _runs_native_swiglu(x, experts):
        return None
    return native_int4.swiglu_mixture(x, [_native_operands(*expert) for expert in experts], weights, experts[0][0].group_size)


def _runs_native_swiglu(x: torch.Tensor, experts: list[tuple[Int4Weight, Int4Weight]]) -> bool:
    """bf16 x, and every matrix packed for the native kernel with the first's group size."""
    group_size = experts[0][0].group_size
    return x.dtype == torch.bfloat16 and all(
        weight.kernel == "native" and weight.group_size == group_size for expert in experts for weight in expert
    )


def _native_operands(gate_up: Int4Weight, down: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gate_up.packed, gate_up.scales_and_zeros, down.packed, down.scales_and_zeros


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Weight:
    """weight [N, K] (any float dtype) -> Int4Weight; each group's [min, max] maps onto 16 levels."""
    return Int4Weight.from_codes(*int4_codes(weight, group_size), group_size)


def int4_codes(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] int32 in 0..15, scales_and_zeros [K/group_size, N, 2] bf16), before any packing."""
    rows, in_features = weight.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, not {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the matrix's {in_features} input channels")
    groups = weight.float().reshape(rows, in_features // group_size, group_size)  # [N, G, group_size]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, G]
    scales = ((high - low) / INT4_LEVELS).clamp_min(torch.finfo(torch.float32).tiny).to(KERNEL_DTYPE)
    zeros = (low + INT4_OFFSET * scales.float()).to(KERNEL_DTYPE)  # the value that q = 8 stands for
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None]) + INT4_OFFSET
    q = q.clamp(0, INT4_LEVELS).to(torch.int32).reshape(rows, in_features)  # [N, K]
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
    return q, scales_and_zeros
