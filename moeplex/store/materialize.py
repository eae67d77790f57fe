"""Build one stored expert from a plan group's source: the weighted sum of its member experts."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeplex.consolidate.family_spec import OpenCheckpoint
from moeplex.consolidate.plan import ExpertSource, Position

# Reads one model's expert: position -> {"gate_up": [2I, H], "down": [H, I]} (Switch: {"wi", "wo"}).
ExpertReader = Callable[[Position], dict[str, torch.Tensor]]


def checkpoint_expert_reader(checkpoints: dict[str, OpenCheckpoint]) -> ExpertReader:
    """Reads experts one at a time from the family's memory-mapped checkpoints."""

    def read(position: Position) -> dict[str, torch.Tensor]:
        name, layer, expert = position
        checkpoint = checkpoints[name]
        return checkpoint.family.read_expert(checkpoint.reader, checkpoint.spec, layer, expert)

    return read


def materialize_expert(source: ExpertSource, read: ExpertReader, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Each part of the expert ({"gate_up", "down"}, or Switch's {"wi", "wo"}) = sum of weight * member's, in fp32.

    The result is cast to `dtype`, or to the first member's dtype when None (so a plain copy is
    byte-identical to its source).
    """
    if len(source.members) == 1:
        member = read(source.members[0])
        return {part: tensor.to(dtype or tensor.dtype).contiguous() for part, tensor in member.items()}
    total: dict[str, torch.Tensor] = {}
    out_dtype = dtype
    for position, weight in zip(source.members, source.weights):
        member = read(position)
        out_dtype = out_dtype or next(iter(member.values())).dtype
        for part, tensor in member.items():
            contribution = tensor.float() * weight
            total[part] = total[part] + contribution if part in total else contribution
    return {part: tensor.to(out_dtype).contiguous() for part, tensor in total.items()}
