"""Grouped-query attention over a flat batch of tokens from sequences of different lengths."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeplex.model import native_attention
from moeplex.model.bf16_upcast import attention_upcast_pays
from moeplex.model.kv_cache import SequenceKVCache
from moeplex.model.ops import linear, rms_norm
from moeplex.model.rope import apply_rotary
from moeplex.model.spec import ModelSpec


@dataclass
class AttentionWeights:
    qkv: torch.Tensor  # [q + 2 kv, H], q/k/v projections fused
    o: torch.Tensor  # [H, q]
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass
class SequenceChunk:
    """num_tokens new tokens of one sequence, at positions start..start+num_tokens of its cache."""

    cache: SequenceKVCache
    start: int
    num_tokens: int


def attention(
    spec: ModelSpec,
    layer: int,
    x: torch.Tensor,  # [T, H], normalized
    weights: AttentionWeights,
    cos: torch.Tensor,  # [T, 1, D]
    sin: torch.Tensor,  # [T, 1, D], signed (`moeplex.model.rope.RotaryEmbedding.cos_sin`)
    chunks: list[SequenceChunk],
) -> torch.Tensor:
    """Self-attention output [T, H]; writes this step's keys/values into each sequence's cache.

    A decode step (one token per sequence) on the CPU in bf16 takes moeplex's native kernel, one call per sequence from
    rotation to attention (`moeplex.model.native_attention.takes_decode_step`); everything else rotates here and
    runs SDPA.
    """
    qkv = linear(x, weights.qkv, weights.qkv_bias)  # [T, q + 2 kv]
    q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
    if spec.qk_norm == "full":
        q, k = rms_norm(q, weights.q_norm, spec.rms_norm_eps), rms_norm(k, weights.k_norm, spec.rms_norm_eps)
    if spec.clip_qkv is not None:
        q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
    q = q.view(-1, spec.num_heads, spec.head_dim)  # [T, Hq, D]
    k = k.reshape(-1, spec.num_kv_heads, spec.head_dim)  # [T, Hkv, D]
    v = v.reshape(-1, spec.num_kv_heads, spec.head_dim)
    if spec.qk_norm == "head":
        q, k = rms_norm(q, weights.q_norm, spec.rms_norm_eps), rms_norm(k, weights.k_norm, spec.rms_norm_eps)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    if native_attention.takes_decode_step(q, k, v, cos, sin, chunks, spec.sliding_window):  # one call per sequence
        for row, chunk in enumerate(chunks):
            native_attention.rotate_write_attend(q[row], k[row], v[row], cos[row], sin[row], chunk.cache, layer, chunk.start, out[row])
        return linear(out.view(-1, spec.q_size), weights.o, weights.o_bias)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    offset = 0
    for chunk in chunks:
        rows = slice(offset, offset + chunk.num_tokens)
        offset += chunk.num_tokens
        keys, values = chunk.cache.write(layer, chunk.start, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
        out[rows] = _attend(spec, q[rows].transpose(0, 1), keys, values, chunk.start).transpose(0, 1)
    return linear(out.view(-1, spec.q_size), weights.o, weights.o_bias)


def _attend(spec: ModelSpec, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """q [Hq, n, D] at positions start.., keys/values [Hkv, start+n, D] -> [Hq, n, D].

    In fp32 where that is the faster way on this CPU (`moeplex.model.bf16_upcast.attention_upcast_pays`).
    """
    n, total = q.shape[1], keys.shape[1]
    mask = _causal_mask(n, total, start, spec.sliding_window, q.device)
    if attention_upcast_pays(q, total):
        return _sdpa(q.float(), keys.float(), values.float(), mask).to(q.dtype)
    return _sdpa(q, keys, values, mask)


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, enable_gqa=True
    ).squeeze(0)


def _causal_mask(n: int, total: int, start: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [n, total] mask (True = attend), or None when every query sees every key."""
    if n == 1 and (window is None or total <= window):
        return None
    query_pos = torch.arange(start, start + n, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask
