"""Command-line dtype names: bf16 and fp32, anything else refused with the choices named."""

from __future__ import annotations

import pytest
import torch

from moeplex.dtypes import resolve_dtype


def test_dtype_names_map_to_torch_dtypes():
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("fp32") == torch.float32


def test_an_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match="expected one of bf16, fp32"):
        resolve_dtype("fp16")
