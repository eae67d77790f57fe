"""Per-sequence key/value cache: contiguous [layers, kv_heads, capacity, head_dim] tensors that grow."""

from __future__ import annotations

import torch

from moeplex.model.spec import ModelSpec


class SequenceKVCache:
    """Keys and values of one sequence for every layer; capacity grows by doubling."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu", capacity: int = 64):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.length = 0  # tokens whose keys and values are stored for every layer
        shape = (spec.num_layers, spec.num_kv_heads, capacity, spec.head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def reserve(self, total_tokens: int) -> None:
        """Make room for total_tokens positions, copying what is stored."""
        if total_tokens <= self.capacity:
            return
        capacity = max(total_tokens, 2 * self.capacity)
        shape = (self.spec.num_layers, self.spec.num_kv_heads, capacity, self.spec.head_dim)
        for name in ("keys", "values"):
            grown = torch.empty(shape, dtype=self.dtype, device=self.device)
            grown[:, :, : self.length] = getattr(self, name)[:, :, : self.length]
            setattr(self, name, grown)

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [kv_heads, n, D] at positions start..start+n; return all [kv_heads, start+n, D]."""
        end = start + keys.shape[1]
        self.keys[layer, :, start:end] = keys
        self.values[layer, :, start:end] = values
        return self.keys[layer, :, :end], self.values[layer, :, :end]
