"""Small numeric kernels of the runtime: linear, RMSNorm, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeplex.model.bf16_upcast import upcast_pays
from moeplex.model import native_gemv, native_norm
from moeplex.model.grouped import GroupedWeight, grouped_linear, mv_pays, native_gemv_pays


def linear(x: torch.Tensor, weight: torch.Tensor | GroupedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight[out, in].T (+ bias) -> [T, out]; bias [out] or one per row [T, out].

    A GroupedWeight multiplies each row group by its own matrix (`moeplex.model.grouped`). A single
    row goes through torch.mv where its GEMV streams weights faster than F.linear's M=1 path (most CPUs;
    `moeplex.model.grouped.mv_pays`; `moeplex bench decode` measures the effect end to end). A few bf16 rows
    go through moeplex's native GEMV where it pays (`moeplex.model.grouped.native_gemv_pays`). Many bf16
    rows on a CPU that emulates bf16 matmuls are multiplied in fp32 (`moeplex.model.bf16_upcast`).
    """
    if isinstance(weight, GroupedWeight):
        out = grouped_linear(x, weight)
        return out if bias is None else out + bias
    if native_gemv_pays(x, weight):
        out = native_gemv.gemv(x, weight)
        return out if bias is None else out + bias
    if x.shape[0] == 1 and mv_pays(x):
        out = torch.mv(weight, x[0]).unsqueeze(0)
        return out if bias is None else out + bias
    if upcast_pays(x, x.shape[0], weight.numel()):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back, then scaled (the order transformers uses); weight may hold one row per token.

    A decode step's few bf16 rows on the CPU take moeplex's native RMSNorm, one call (`moeplex.model.native_norm`).
    """
    if native_norm.fits(x, weight) and native_norm.available():
        return native_norm.rms_norm(x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x [.., H] scaled to unit root mean square in fp32 (one fused op), cast back: rms_norm without its weight."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def swiglu_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """silu(x W_gate) * (x W_up) W_down, with gate and up fused as gate_up [2I, H]."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)  # [T, I] each
    return linear(F.silu(gate) * up, down)  # [T, H]
