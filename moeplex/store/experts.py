"""The expert door of a variant loaded from a store: (layer, e) -> expert id -> one shared resident copy."""

from __future__ import annotations

import torch

from moeplex.model.experts import DenseExperts
from moeplex.store.manifest import ExpertTable

BANK_LAYER = 0  # the bank stacks every unique expert as if they were the experts of one layer


def bank_order(tables: list[ExpertTable]) -> list[str]:
    """Every expert id the tables use, once, layer by layer: each layer's experts are then consecutive bank rows."""
    num_layers = max((len(table) for table in tables), default=0)
    return list(dict.fromkeys(i for layer in range(num_layers) for table in tables if table[layer] for i in table[layer]))


class ExpertBank:
    """Every unique expert that the loaded variants use, resident once: gate_up [N, 2I, H], down [N, H, I].

    Positions of any variant (and of any layer) that share an expert id run on the same row, so
    tokens of different variants that hit a shared expert are grouped into one matmul.
    """

    def __init__(self, expert_ids: list[str], compute: DenseExperts):
        self.row_of = {expert_id: row for row, expert_id in enumerate(expert_ids)}
        self.compute = compute

    def rows(self, table: ExpertTable, device) -> list[torch.Tensor | None]:
        """Per layer, each expert index's bank row ([E] int64), or None for a dense layer."""
        return [
            None if ids is None else torch.tensor([self.row_of[i] for i in ids], dtype=torch.long, device=device)
            for ids in table
        ]

    @property
    def nbytes(self) -> int:
        return self.compute.nbytes


class StoreExperts:
    """ExpertCompute for one variant: maps its router's expert indices to bank rows and runs them grouped."""

    def __init__(self, bank: ExpertBank, rows: list[torch.Tensor | None]):
        self.bank, self.rows = bank, rows

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        bank_rows = self.rows[layer][expert_ids]  # [T, k]
        return self.bank.compute(BANK_LAYER, hidden, bank_rows, routing_weights)

    @property
    def nbytes(self) -> int:
        """Bytes of the shared bank (counted once, however many variants use it)."""
        return self.bank.nbytes
