"""Rotary position embeddings: inverse frequencies from the config (theta and scaling), applied per token."""

from __future__ import annotations

import math

import torch

from moeplex.errors import UnsupportedModelError
from moeplex.model.spec import ModelSpec


class RotaryEmbedding:
    """Precomputed cos/sin tables indexed by absolute position; sin with its first half negated (`apply_rotary`)."""

    def __init__(self, spec: ModelSpec, device: torch.device | str = "cpu"):
        self.inv_freq, self.attention_scaling = inverse_frequencies(spec)
        self.inv_freq = self.inv_freq.to(device)
        self._cos = self._signed_sin = torch.empty(0, spec.head_dim, device=device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin of shape [T, 1, head_dim] for the given positions [T] (one row per token, broadcast over heads)."""
        needed = int(positions.max()) + 1
        if needed > self._cos.shape[0]:
            self._grow(max(needed, 2 * self._cos.shape[0], 256))
        return self._cos[positions, None].to(dtype), self._signed_sin[positions, None].to(dtype)

    def _grow(self, length: int) -> None:
        pos = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [L, D]
        sin = emb.sin() * self.attention_scaling
        half = sin.shape[-1] // 2
        self._cos, self._signed_sin = emb.cos() * self.attention_scaling, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos / signed sin [T, 1, D] (`RotaryEmbedding.cos_sin`; rotate-half convention).

    rotate_half(x) * sin = cat(-x2, x1) * sin equals x rolled by half (cat(x2, x1)) times sin with its first half
    negated, bit for bit (negation is exact): three fewer torch calls per use than the rotate-half form.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def inverse_frequencies(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """inv_freq [D/2] and the attention scaling factor for the spec's rope type."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling), 1.0
    raise UnsupportedModelError(f"rope_type '{rope_type}' is not supported (default, linear, llama3)")


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3's piecewise scaling: long wavelengths divided by factor, short kept, smooth between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(is_medium, smoothed, scaled)
