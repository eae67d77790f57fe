"""moeplex's native CPU int4 kernel: exact to the dequantized matrix, same answers as torch's kernel, clear refusals."""

import contextlib

import pytest
import torch

from moeplex.quant import native_int4
from moeplex.quant import kernels
from moeplex.quant.int4 import int4_codes, quantize_int4
from moeplex.quant.kernels import native_int4_forced

pytestmark = pytest.mark.skipif(not native_int4.available(), reason="the native int4 kernel needs x86-64 with AVX2 and a C compiler")


def dequantized(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The [N, K] float32 matrix that codes and (scale, zero) pairs stand for: (q - 8) * scale + zero."""
    rows, columns = q.shape
    scales, zeros = (scales_and_zeros[..., i].T.float()[..., None] for i in (0, 1))  # [N, G, 1]
    return ((q.float().reshape(rows, -1, group_size) - 8) * scales + zeros).reshape(rows, columns)


def kernel_path(path: str, group_size: int):
    """A block in which the kernel takes `path` ("avx512" or "avx2") for this group size; skips where it cannot."""
    if path == "avx2":
        return native_int4.AVX512_SWITCH.turned_off()
    if not native_int4.runs_avx512(group_size):
        pytest.skip("the AVX-512 path needs AVX512-BW, VL and VNNI and groups of 64 or 128")
    return contextlib.nullcontext()


@pytest.mark.parametrize("path", ["avx512", "avx2"])
@pytest.mark.parametrize("rows,columns,group_size", [(64, 128, 32), (96, 256, 64), (200, 384, 128), (32, 1024, 128), (7, 128, 64)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 9])
def test_native_matmul_matches_the_dequantized_matrix(rows, columns, group_size, tokens, path):
    generator = torch.Generator().manual_seed(rows * tokens + group_size)
    weight = torch.randn(rows, columns, generator=generator)
    x = torch.randn(tokens, columns, generator=generator) * torch.rand(tokens, 1, generator=generator) * 10
    q, scales_and_zeros = int4_codes(weight, group_size)
    packed, kernel_scales = native_int4.pack(q, scales_and_zeros)

    with kernel_path(path, group_size):
        out = native_int4.matmul(x, packed, group_size, kernel_scales)

    reference = x.double() @ dequantized(q, scales_and_zeros, group_size).double().T
    magnitude = x.abs().double() @ dequantized(q, scales_and_zeros, group_size).abs().double().T
    # activations enter as 16-bit fixed point per group: 2^-15 of the group's largest value, far below bf16's 2^-8
    assert out.shape == (tokens, rows) and out.dtype == torch.float32
    assert ((out.double() - reference).abs() <= 1e-4 * magnitude + 1e-6).all()


@pytest.mark.parametrize("path", ["avx512", "avx2"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_bf16_in_and_out_is_the_float32_result_rounded(path, tokens):
    generator = torch.Generator().manual_seed(17 + tokens)
    q, scales_and_zeros = int4_codes(torch.randn(72, 256, generator=generator), 128)
    packed, kernel_scales = native_int4.pack(q, scales_and_zeros)
    x = (torch.randn(tokens, 256, generator=generator) * 3).bfloat16()
    with kernel_path(path, 128):
        in_float = native_int4.matmul(x.float(), packed, 128, kernel_scales)
        in_bf16 = native_int4.matmul(x, packed, 128, kernel_scales)
    assert in_float.dtype == torch.float32 and in_bf16.dtype == torch.bfloat16
    assert torch.equal(in_bf16, in_float.bfloat16())  # the kernel's own casts are torch's, bit for bit


def composed_swiglu(x: torch.Tensor, gate_up, down) -> torch.Tensor:
    """The same expert as torch calls around the kernel's matmuls: bf16 gate_up output, silu and product in bf16."""
    gate, up = gate_up.matmul(x).chunk(2, dim=-1)
    return down.matmul(torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("path", ["avx512", "avx2"])
@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_the_one_call_swiglu_expert_rounds_as_the_composed_one(path, tokens):
    generator = torch.Generator().manual_seed(23 + tokens)
    hidden, inter = 256, 384
    with native_int4_forced():
        gate_up = quantize_int4(torch.randn(2 * inter, hidden, generator=generator) * 0.1, 128)
        down = quantize_int4(torch.randn(hidden, inter, generator=generator) * 0.1, 128)
    x = (torch.randn(tokens, hidden, generator=generator) * 2).bfloat16()
    with kernel_path(path, 128):
        fused = native_int4.swiglu(x, gate_up.packed, gate_up.scales_and_zeros, down.packed, down.scales_and_zeros, 128)
        composed = composed_swiglu(x, gate_up, down)
    assert fused.shape == (tokens, hidden) and fused.dtype == torch.bfloat16
    # the same roundings; only where C's expf and torch's vectorized exp differ in silu's last float bit may a
    # bf16 rounding flip, moving an output by about one bf16 step
    assert (fused == composed).float().mean() >= 0.95
    assert ((fused.float() - composed.float()).abs() <= 2.0**-7 * composed.float().abs() + 1e-3).all()


def test_the_swiglu_expert_refuses_what_it_cannot_compute():
    with native_int4_forced():
        gate_up, down = quantize_int4(torch.randn(128, 64), 64), quantize_int4(torch.randn(64, 64), 64)
    arguments = (gate_up.packed, gate_up.scales_and_zeros, down.packed, down.scales_and_zeros, 64)
    with pytest.raises(native_int4.NativeKernelError, match="takes bf16 x"):
        native_int4.swiglu(torch.randn(1, 64), *arguments)  # float32 rows
    with pytest.raises(native_int4.NativeKernelError, match="takes bf16 x"):
        native_int4.swiglu(torch.randn(1, 128).bfloat16(), *arguments)  # H does not match the matrices


@pytest.mark.parametrize("path", ["avx512", "avx2"])
def test_the_expert_mixture_is_each_swiglu_weighted_and_summed_as_torch_rounds_it(path):
    generator = torch.Generator().manual_seed(31)
    hidden, inter = 256, 384
    with native_int4_forced():
        experts = [(quantize_int4(torch.randn(2 * inter, hidden, generator=generator) * 0.1, 128),
                    quantize_int4(torch.randn(hidden, inter, generator=generator) * 0.1, 128)) for _ in range(3)]
    operands = [(g.packed, g.scales_and_zeros, d.packed, d.scales_and_zeros) for g, d in experts]
    x = (torch.randn(1, hidden, generator=generator) * 2).bfloat16()
    weights = torch.rand(3, generator=generator).tolist()
    with kernel_path(path, 128):
        mixture = native_int4.swiglu_mixture(x, operands, weights, 128)
        summed = None
        for expert, weight in zip(operands, weights):  # QuantizedExperts.one_token's torch calls
            y = native_int4.swiglu(x, *expert, 128).mul_(weight)
            summed = y if summed is None else summed.add_(y)
    assert mixture.shape == (1, hidden) and mixture.dtype == torch.bfloat16
    assert torch.equal(mixture, summed)
    with pytest.raises(native_int4.NativeKernelError, match="one bf16 token and a weight per expert"):
        native_int4.swiglu_mixture(x, operands, weights[:2], 128)
    with pytest.raises(native_int4.NativeKernelError, match="one bf16 token"):
        native_int4.swiglu_mixture(x.repeat(2, 1), operands, weights, 128)
    with pytest.raises(native_int4.NativeKernelError, match="share one shape"):
        native_int4.swiglu_mixture(x[:, :128], operands, weights, 128)


def test_native_and_torch_kernels_agree_through_int4_weight():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(256, 512, generator=generator).bfloat16()
    with native_int4_forced():
        native = quantize_int4(weight, 64)
    with native_int4.SWITCH.turned_off():
        tinygemm = quantize_int4(weight, 64)
    assert (native.kernel, tinygemm.kernel) == ("native", "cpu-tinygemm")
    assert native.nbytes == tinygemm.nbytes

    x = torch.randn(6, 512, generator=generator).bfloat16()
    a, b = native.matmul(x).float(), tinygemm.matmul(x).float()
    assert native.matmul(x).dtype == torch.bfloat16
    assert ((a - b).abs() <= 0.02 * b.abs() + 0.05).all()
    assert torch.allclose(native.dequantize(), tinygemm.dequantize(), rtol=0.01, atol=0.01)


@pytest.mark.parametrize("path,group_size", [("avx2", 32), ("avx512", 64)])
def test_a_nan_activation_makes_its_row_nan_and_leaves_the_others(path, group_size):
    q, scales_and_zeros = int4_codes(torch.randn(40, 128), group_size)
    packed, kernel_scales = native_int4.pack(q, scales_and_zeros)
    x = torch.randn(3, 128)
    x[1, 70] = float("nan")
    with kernel_path(path, group_size):
        out = native_int4.matmul(x, packed, group_size, kernel_scales)
    assert out[1].isnan().all()
    assert torch.isfinite(out[[0, 2]]).all()


def test_both_paths_give_the_same_sums_and_groups_of_32_keep_the_avx2_path():
    generator = torch.Generator().manual_seed(11)
    q, scales_and_zeros = int4_codes(torch.randn(130, 512, generator=generator), 128)
    packed, kernel_scales = native_int4.pack(q, scales_and_zeros)
    x = torch.randn(6, 512, generator=generator)
    with kernel_path("avx512", 128):
        wide = native_int4.matmul(x, packed, 128, kernel_scales)
    with kernel_path("avx2", 128):
        narrow = native_int4.matmul(x, packed, 128, kernel_scales)
    # the same fixed-point products, summed exactly in 32 bits; only the float additions differ in order
    assert torch.allclose(wide, narrow, rtol=1e-5, atol=1e-4)
    assert not native_int4.runs_avx512(32)


def test_shapes_the_layout_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="multiple of 32 input channels"):
        native_int4.pack(torch.zeros(4, 48, dtype=torch.int32), torch.zeros(1, 4, 2, dtype=torch.bfloat16))
    q, scales_and_zeros = int4_codes(torch.randn(8, 64), 32)
    packed, kernel_scales = native_int4.pack(q, scales_and_zeros)
    with pytest.raises(native_int4.NativeKernelError, match="group size 48"):
        native_int4.matmul(torch.randn(1, 64), packed, 48, kernel_scales)


def test_without_a_compiler_int4_falls_back_to_torchs_kernel(python_without_compiler):
    script = (
        "import warnings, torch\n"
        "from moeplex.quant import native_int4\n"
        "from moeplex.quant.int4 import quantize_int4\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    weight = quantize_int4(torch.randn(16, 64), 32)\n"
        "print(weight.kernel, native_int4.available(), any('could not be built' in str(w.message) for w in caught))\n"
    )
    assert python_without_compiler(script).split() == ["cpu-tinygemm", "False", "True"]


def test_kernel_benchmark_times_every_kernel_at_every_token_count(monkeypatch):
    from moeplex.quant import bench_kernels

    monkeypatch.setattr(bench_kernels, "ROWS", 256)
    monkeypatch.setattr(bench_kernels, "STACK_BYTES", 4 * 256 * 1024 * 2)  # four small matrices
    monkeypatch.setattr(bench_kernels, "TOKENS", (1, 3))
    result = bench_kernels.run_kernel_benchmark(threads=1, group_size=128, repeats=2)
    avx2_beside = {"int4-avx2"} if native_int4.runs_avx512(128) else set()
    assert set(result["kernel_ms"]) == {"bf16", "int4-torch", "int4-native"} | avx2_beside
    assert all(set(times) == {"1", "3"} and min(times.values()) > 0 for times in result["kernel_ms"].values())
    table = bench_kernels.format_kernel_table(result)
    assert "[256, 1024]" in table and len(table.splitlines()) == 4


@pytest.mark.parametrize("torch_avx512", [True, False])
@pytest.mark.parametrize("amx", [True, False])
def test_int4_packs_for_torch_only_where_it_runs_avx512_beside_amx(monkeypatch, torch_avx512, amx):
    monkeypatch.setattr(kernels, "torch_runs_avx512", lambda: torch_avx512)
    monkeypatch.setattr(kernels, "has_amx_bf16", lambda: amx)
    weight = torch.randn(64, 128).bfloat16()
    assert quantize_int4(weight, 32).kernel == ("cpu-tinygemm" if torch_avx512 and amx else "native")
    with native_int4_forced():
        assert quantize_int4(weight, 32).kernel == "native"
    with native_int4.SWITCH.turned_off(), native_int4_forced():
        assert quantize_int4(weight, 32).kernel == "cpu-tinygemm"


def test_int4_packs_for_the_native_kernel_wherever_it_runs_its_avx512_path(monkeypatch):
    monkeypatch.setattr(kernels, "torch_runs_avx512", lambda: True)
    monkeypatch.setattr(kernels, "has_amx_bf16", lambda: True)
    monkeypatch.setattr(native_int4, "runs_avx512", lambda group_size: group_size % 64 == 0)
    weight = torch.randn(64, 128).bfloat16()
    assert quantize_int4(weight, 128).kernel == "native"
    assert quantize_int4(weight, 64).kernel == "native"
    assert quantize_int4(weight, 32).kernel == "cpu-tinygemm"  # the AVX2 path only: torch's AVX-512 kernel is faster


def test_torchs_dispatch_level_decides(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not kernels.torch_runs_avx512()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert kernels.torch_runs_avx512()


@pytest.mark.parametrize("native,avx512,name", [(False, True, "torch"), (True, False, "native"), (True, True, "native-avx512")])
def test_the_kernel_name_tells_torch_native_and_its_avx512_path_apart(monkeypatch, native, avx512, name):
    monkeypatch.setattr(kernels, "uses_native_int4", lambda group_size: native)
    monkeypatch.setattr(native_int4, "runs_avx512", lambda group_size: avx512)
    assert kernels.int4_kernel_name(128) == name
