"""int8 weight-only format: symmetric, one scale per output channel."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplex.quant.kernels import KERNEL_DTYPE, int8_mm

INT8_MAX = 127  # symmetric range [-127, 127]


@dataclass
class Int8Weight:
    """A [N, K] matrix as int8 values and per-row scales: W ~= qweight * scales[:, None]."""

    qweight: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] bf16

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] @ W.T -> [M, N], in x's dtype."""
        return int8_mm(x.to(KERNEL_DTYPE), self.qweight, self.scales).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The matrix the kernel multiplies by, [N, K] float32."""
        return self.qweight.float() * self.scales.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """weight [N, K] (any float dtype) -> Int8Weight; each row's largest magnitude maps to 127."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny).to(KERNEL_DTYPE)  # [N]
    q = torch.round(w / scales.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)  # [N, K]
    return Int8Weight(q, scales)
