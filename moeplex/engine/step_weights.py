"""Backbone weights of a step that mixes variants: every operation runs once for all of the step's tokens.

Full fine-tuning changes every backbone tensor, so a step with k variants would otherwise run each
backbone operation k times (one per variant group), and on small models that per-operation cost
dominates. Instead, each tensor that differs between the step's variants becomes, for the step,
- a `GroupedWeight` for matrices (one grouped matmul over the variants' row groups), and
- one row per token for vectors (norm weights, biases), which the runtime's ops broadcast;
tensors that all the step's variants share stay as they are. `VariantStacks` keeps each differing
tensor of every resident variant in one stack [variants, ...] (each variant's tensor is a view into
it, so the stack is the only copy); the grouped matmul then runs as one kernel on CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.model.grouped import GroupedWeight, PaddedRows
from moeplex.model.spec import ModelSpec
from moeplex.model.weights import Backbone, LayerWeights, tensor_fields

HEAD_NORMS = ("q_norm", "k_norm")  # per-head norms: their rows broadcast over the heads


class VariantStacks:
    """Every backbone tensor that differs between variants, stacked in variant order; backbones are rewired to views.

    Tensors that every variant shares (one object, see IdenticalTensorPool) are left alone.
    """

    def __init__(self, backbones: dict[str, Backbone]):
        self.slot_of = {variant: slot for slot, variant in enumerate(backbones)}
        self.stacks: dict[str, torch.Tensor] = {}
        stacked: dict[tuple[int, ...], torch.Tensor] = {}  # by the ids of the tensors: tied embeddings and lm_head stack once
        for path, owners, field in tensor_fields(list(backbones.values())):
            values = [getattr(owner, field) for owner in owners]
            if all(v is values[0] for v in values):
                continue
            key = tuple(id(v) for v in values)
            if key not in stacked:
                stacked[key] = torch.stack(values)
            self.stacks[path] = stacked[key]
            for slot, owner in enumerate(owners):
                setattr(owner, field, stacked[key][slot])

    @property
    def nbytes(self) -> int:
        unique = {stack.data_ptr(): stack for stack in self.stacks.values()}
        return sum(stack.numel() * stack.element_size() for stack in unique.values())


@dataclass
class RowGroups:
    """Rows of a flat batch sorted by group: the group of each row [T] and, for grouped matmuls, the offsets."""

    group_of_row: torch.Tensor
    offsets: torch.Tensor
    host_offsets: list[int]
    padded: PaddedRows | None

    @classmethod
    def of(cls, group_sizes: list[int], groups: list[int], num_groups: int, device) -> RowGroups:
        """Rows of groups[i] repeated group_sizes[i] times, in order (groups must be non-decreasing)."""
        group_of_row = torch.repeat_interleave(torch.tensor(groups, device=device), torch.tensor(group_sizes, device=device))
        rows = dict(zip(groups, group_sizes))
        host_offsets = list(itertools.accumulate(rows.get(group, 0) for group in range(num_groups)))
        offsets = torch.tensor(host_offsets, dtype=torch.int32, device=device)
        return cls(group_of_row, offsets, host_offsets, PaddedRows.of(host_offsets, device))


@dataclass
class StepBackbone:
    """The step's backbone: embeddings of its tokens [T, H], layer weights for token rows, head weights for last-token rows."""

    embedded: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor | GroupedWeight


@dataclass
class _StepLayout:
    """What a step's backbone is apart from its tokens; reused while steps keep the same variants and row counts."""

    token_rows: RowGroups
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor | GroupedWeight


class StepWeights:
    """Builds the StepBackbone of a step from its variant groups' backbones (in slot order when stacked).

    With stacks the backbones never change, so the weights of a step shape (variants, rows per variant)
    are kept for the next steps of that shape: decoding repeats one shape step after step.
    """

    max_cached_shapes = 32

    def __init__(self, spec: ModelSpec, stacks: VariantStacks | None = None):
        self.spec, self.stacks = spec, stacks
        self._layouts: dict[tuple, _StepLayout] = {}

    def ordered(self, variants: list[str]) -> list[str]:
        """The step's variants in the order their groups must run: by stack slot (as given without stacks)."""
        if self.stacks is None:
            return list(variants)
        return sorted(variants, key=self.stacks.slot_of.__getitem__)

    def build(self, variants: list[str], backbones: list[Backbone], tokens: list[int], heads: list[int], token_ids: torch.Tensor) -> StepBackbone:
        """tokens[i] and heads[i]: rows of group i in the token batch and in the last-token batch; variants as `ordered` gives them."""
        shape = (tuple(variants), tuple(tokens), tuple(heads))
        layout = self._layouts.get(shape) if self.stacks is not None else None
        if layout is None:
            layout = self._layout(variants, backbones, tokens, heads, token_ids.device)
            if self.stacks is not None:
                if len(self._layouts) >= self.max_cached_shapes:
                    self._layouts.clear()
                self._layouts[shape] = layout
        embedded = self._embed([b.embed for b in backbones], token_ids, layout.token_rows, tokens)
        return StepBackbone(embedded, layout.layers, layout.final_norm, layout.lm_head)

    def _layout(self, variants: list[str], backbones: list[Backbone], tokens: list[int], heads: list[int], device) -> _StepLayout:
        if self.stacks is not None:
            slots, count = [self.stacks.slot_of[v] for v in variants], len(self.stacks.slot_of)
        else:
            slots, count = list(range(len(variants))), len(variants)
        token_rows, head_rows = RowGroups.of(tokens, slots, count, device), RowGroups.of(heads, slots, count, device)
        return _StepLayout(
            token_rows=token_rows,
            layers=[self._merge([b.layers[i] for b in backbones], f"layers.{i}.", token_rows) for i in range(self.spec.num_layers)],
            final_norm=self._merge([b.final_norm for b in backbones], "final_norm", head_rows),
            lm_head=self._merge([b.lm_head for b in backbones], "lm_head", head_rows),
        )

    def _merge(self, values: list, path: str, rows: RowGroups):
        """One value for the step from the groups' values of one backbone field (recursing into dataclasses and lists)."""
        first = values[0]
        if first is None or all(v is first for v in values):
            return first
        if dataclasses.is_dataclass(first):
            return dataclasses.replace(first, **{f.name: self._merge([getattr(v, f.name) for v in values], f"{path}{f.name}.", rows) for f in dataclasses.fields(first)})
        if isinstance(first, list):
            return [self._merge([v[i] for v in values], f"{path}{i}.", rows) for i in range(len(first))]
        path = path.rstrip(".")
        matrices = self._matrices(values, path)
        if first.dim() == 2:
            return GroupedWeight(matrices, rows.offsets, rows.host_offsets, rows.padded, rows.group_of_row)
        per_row = (matrices if isinstance(matrices, torch.Tensor) else torch.stack(matrices))[rows.group_of_row]  # [T, n]
        head_norm = self.spec.qk_norm == "head" and path.rsplit(".", 1)[-1] in HEAD_NORMS
        return per_row.unsqueeze(1) if head_norm else per_row

    def _matrices(self, values: list[torch.Tensor], path: str) -> torch.Tensor | list[torch.Tensor]:
        """The stack holding the groups' tensors of a field, or (without stacks) the tensors themselves."""
        if self.stacks is not None and path in self.stacks.stacks:
            return self.stacks.stacks[path]
        return values

    def _embed(self, tables: list[torch.Tensor], token_ids: torch.Tensor, rows: RowGroups, sizes: list[int]) -> torch.Tensor:
        """Embeddings [T, H] of the step's tokens, each from its own variant's table."""
        first = tables[0]
        if all(t is first for t in tables):
            return F.embedding(token_ids, first)
        stack = self._matrices(tables, "embed")
        if isinstance(stack, torch.Tensor):  # one lookup in the stacked tables: token t of slot s is row s * V + t
            return F.embedding(token_ids + rows.group_of_row * first.shape[0], stack.flatten(0, 1))
        return torch.cat([F.embedding(ids, table) for ids, table in zip(torch.split(token_ids, sizes), tables)])
