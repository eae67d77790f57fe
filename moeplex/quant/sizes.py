"""Bytes of one SwiGLU expert in each precision, from its shape alone (budgets are planned before any weight is read)."""

from __future__ import annotations

from moeplex.quant.formats import UNQUANTIZED

SCALE_BYTES = 2  # bf16 scales (int8, int4) and zeros (int4)


def matrix_nbytes(rows: int, columns: int, precision: str, group_size: int, unquantized_itemsize: int = 2) -> int:
    """One [rows, columns] matrix: int8 = 1 byte per weight + a scale per row; int4 = half a byte + a scale and zero per (row, group)."""
    if precision == UNQUANTIZED:
        return rows * columns * unquantized_itemsize
    if precision == "int8":
        return rows * columns + rows * SCALE_BYTES
    if precision == "int4":
        return rows * columns // 2 + rows * (columns // group_size) * 2 * SCALE_BYTES
    raise ValueError(f"unknown precision '{precision}'")


def expert_nbytes(hidden: int, intermediate: int, precision: str, group_size: int, unquantized_itemsize: int = 2) -> int:
    """gate_up [2I, H] and down [H, I] in one precision (what `QuantizedExpert.nbytes` reports)."""
    return matrix_nbytes(2 * intermediate, hidden, precision, group_size, unquantized_itemsize) + matrix_nbytes(
        hidden, intermediate, precision, group_size, unquantized_itemsize
    )
