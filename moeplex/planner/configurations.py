"""Expert-precision configurations of a store: how many experts in int4, int8 and bf16, and their bytes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from moeplex.quant.formats import UNQUANTIZED


@dataclass(frozen=True)
class Configuration:
    """How many of the store's unique experts are held in each precision (how many are resident follows from the budget)."""

    int4: int
    int8: int
    bf16: int

    @property
    def quantized_counts(self) -> dict[str, int]:
        """The counts a selection policy's `choose` takes."""
        return {"int4": self.int4, "int8": self.int8}

    @property
    def key(self) -> str:
        return f"int4={self.int4},int8={self.int8},bf16={self.bf16}"

    def to_json(self) -> dict[str, int]:
        return {"int4": self.int4, "int8": self.int8, UNQUANTIZED: self.bf16}

    @staticmethod
    def from_json(data: Mapping[str, int]) -> Configuration:
        return Configuration(int(data["int4"]), int(data["int8"]), int(data[UNQUANTIZED]))

    def expert_bytes(self, bytes_per_expert: Mapping[str, int]) -> int:
        """Bytes of every expert in its precision."""
        return sum(count * bytes_per_expert[precision] for precision, count in self.to_json().items())


def all_unquantized(num_experts: int) -> Configuration:
    return Configuration(0, 0, num_experts)


def configuration_grid(num_experts: int, steps: int) -> list[Configuration]:
    """Every split of the experts into int4 / int8 / bf16 at multiples of 1/steps of them (int4 and int8 may be 0).

    With steps=4 and 160 experts: int4 and int8 counts in {0, 40, 80, 120, 160}, summing to at most 160;
    15 configurations, from all bf16 to all int4.
    """
    if steps < 1 or num_experts < 1:
        raise ValueError(f"need steps >= 1 and experts >= 1, got steps={steps}, experts={num_experts}")
    grid = []
    for int4_steps in range(steps + 1):
        for int8_steps in range(steps + 1 - int4_steps):
            int4 = num_experts * int4_steps // steps
            quantized = num_experts * (int4_steps + int8_steps) // steps
            grid.append(Configuration(int4, quantized - int4, num_experts - quantized))
    return grid
