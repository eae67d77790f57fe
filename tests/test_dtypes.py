"""`--dtype auto`: bf16 where matmuls have native bf16 (CUDA, AVX512-BF16, AMX), fp32 elsewhere."""

from __future__ import annotations

import pytest
import torch

from moeplex import dtypes

SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\nbugs\t\t: sysret_ss_attrs\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert dtypes.cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert not dtypes.cpu_has_native_bf16(EPYC_AVX2)
    assert not dtypes.cpu_has_native_bf16("")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_follows_the_cpu_and_cuda_is_always_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: native)
    assert dtypes.resolve_dtype("auto") == expected
    assert dtypes.resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert dtypes.resolve_dtype("bf16") == torch.bfloat16 and dtypes.resolve_dtype("fp32") == torch.float32


def test_an_unknown_dtype_name_is_refused():
    with pytest.raises(ValueError, match="expected one of auto, bf16, fp32"):
        dtypes.resolve_dtype("fp16")
