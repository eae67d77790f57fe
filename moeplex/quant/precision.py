"""One weight matrix in any precision, behind one small interface (`matmul`, `nbytes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeplex.model.ops import linear
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, PRECISIONS
from moeplex.quant.int4 import quantize_int4
from moeplex.quant.int8 import quantize_int8


class LinearWeight(Protocol):
    """One weight matrix W [N, K] in some precision."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x [M, K] -> x @ W.T [M, N], in x's dtype
        ...

    @property
    def nbytes(self) -> int: ...


@dataclass
class DenseWeight:
    """An unquantized matrix, multiplied exactly as the runtime's DenseExperts does."""

    weight: torch.Tensor  # [N, K]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    return precision


def quantize_matrix(weight: torch.Tensor, precision: str, group_size: int = DEFAULT_GROUP_SIZE) -> LinearWeight:
    """weight [N, K] in `precision`; an unquantized one is copied so the source can be freed."""
    if check_precision(precision) == "int8":
        return quantize_int8(weight)
    if precision == "int4":
        return quantize_int4(weight, group_size)
    return DenseWeight(weight.clone())
