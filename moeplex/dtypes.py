"""Compute dtype names of the command line (`bf16`, `fp32`) and the torch dtypes they stand for.

No torch import at module level, so that building the CLI parser stays light.
"""

from __future__ import annotations

DTYPE_CHOICES = ("bf16", "fp32")
DTYPE_HELP = "compute dtype: bf16 (default) or fp32"


def resolve_dtype(name: str):
    """The torch dtype for a DTYPE_CHOICES name."""
    import torch

    if name not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    return torch.bfloat16 if name == "bf16" else torch.float32
