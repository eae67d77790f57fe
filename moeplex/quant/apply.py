"""Put QuantizedExperts behind a single model or behind a store's shared ExpertBank."""

from __future__ import annotations

from collections.abc import Mapping

from moeplex.model.experts import DenseExperts
from moeplex.model.runtime import MoEModel
from moeplex.quant.experts import QuantizedExpert, QuantizedExperts
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, Position
from moeplex.store.experts import BANK_LAYER, ExpertBank


def quantize_model_experts(
    model: MoEModel, precision_of: Mapping[Position, str], group_size: int = DEFAULT_GROUP_SIZE
) -> MoEModel:
    """A model sharing `model`'s backbone whose experts have the given precisions (unlisted: unquantized).

    `model` must hold DenseExperts (as `load_model` gives); drop it afterwards to free its experts.
    """
    if not isinstance(model.experts, DenseExperts):
        raise ValueError(f"can only quantize resident DenseExperts, not {type(model.experts).__name__}")
    experts = QuantizedExperts.from_dense(model.experts, precision_of, group_size)
    return MoEModel(model.spec, model.backbone, experts, model.dtype, model.device)


def quantize_bank_experts(
    bank: ExpertBank,
    precision_of_id: Mapping[str, str],
    group_size: int = DEFAULT_GROUP_SIZE,
    quantized_of_id: Mapping[str, QuantizedExpert] | None = None,
) -> None:
    """Give each expert id of the bank its precision (unlisted: unquantized), in place.

    Ids in `quantized_of_id` take that expert as given (e.g. the store's quantized copy, `moeplex.quant.store_copies`)
    instead of being quantized from the bank's dense stacks; its precision must be precision_of_id's.
    Every StoreExperts and engine runner holding this bank computes with the new precisions from its next
    step on, and the bank's old dense stacks are freed when nothing else holds them.
    """
    if not isinstance(bank.compute, DenseExperts):
        raise ValueError(f"can only quantize a bank of DenseExperts, not {type(bank.compute).__name__}")
    quantized_of_id = quantized_of_id or {}
    unknown = sorted((set(precision_of_id) | set(quantized_of_id)) - set(bank.row_of))
    if unknown:
        raise ValueError(f"expert ids not in the bank: {unknown[:5]}")
    by_row = {(BANK_LAYER, bank.row_of[expert_id]): precision for expert_id, precision in precision_of_id.items()}
    given = {(BANK_LAYER, bank.row_of[expert_id]): expert for expert_id, expert in quantized_of_id.items()}
    bank.compute = QuantizedExperts.from_dense(bank.compute, by_row, group_size, given)
