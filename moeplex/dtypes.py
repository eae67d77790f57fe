"""Compute dtype names of the command line (`auto`, `bf16`, `fp32`) and what `auto` picks on this machine.

No torch import at module level, so that building the CLI parser stays light.
"""

from __future__ import annotations

from pathlib import Path

DTYPE_CHOICES = ("auto", "bf16", "fp32")
DTYPE_HELP = (
    "compute dtype: bf16, fp32, or auto (default): bf16 on CUDA and on CPUs with native bf16 matmuls "
    "(AVX512-BF16 or AMX), fp32 on other CPUs, where bf16 matmuls are emulated and several times slower"
)
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively, from /proc/cpuinfo's flags (False where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_dtype(name: str, device: str = "cpu"):
    """The torch dtype for a DTYPE_CHOICES name on device."""
    import torch

    if name == "auto":
        native = device.startswith("cuda") or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    return torch.bfloat16 if name == "bf16" else torch.float32
