"""`moeplex bench quant --parts kernels`: one expert-shaped matmul in bf16, torch's int4 kernel and moeplex's native one.

Where the native kernel runs its AVX-512 path, its AVX2 path on the same packed matrices is timed beside it.

Each kernel multiplies M activation rows (M = 1 is batch-1 decoding; larger M are an expert's tokens in a
batch) by a stack of bench-model gate_up matrices [4096, 1024] larger than the caches, one after the
other, so the weights stream from memory as they do in decoding. The kernels alternate after a warm-up
and each M's time is the median over the repeats of the mean per matrix.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moeplex.bench.measure import alternate, median
from moeplex.quant import native_int4
from moeplex.quant.int4 import quantize_int4
from moeplex.quant.kernels import native_int4_forced

ROWS, COLUMNS = 4096, 1024  # the bench model's fused gate_up
STACK_BYTES = 256 * 2**20  # bf16 matrices in the stack: well past any L3
TOKENS = (1, 2, 4, 8, 16)


def run_kernel_benchmark(threads: int, group_size: int, repeats: int, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    count = STACK_BYTES // (ROWS * COLUMNS * 2)
    dense = [torch.randn(ROWS, COLUMNS, generator=generator).bfloat16() for _ in range(count)]
    kernels = {"bf16": [lambda x, w=w: F.linear(x, w) for w in dense]}
    with native_int4.SWITCH.turned_off():
        kernels["int4-torch"] = [quantize_int4(w, group_size).matmul for w in dense]
    if native_int4.available():
        with native_int4_forced():
            kernels["int4-native"] = [quantize_int4(w, group_size).matmul for w in dense]
        if native_int4.runs_avx512(group_size):
            kernels["int4-avx2"] = [functools.partial(_on_avx2_path, matmul) for matmul in kernels["int4-native"]]

    milliseconds: dict[str, dict[str, float]] = {name: {} for name in kernels}
    for tokens in TOKENS:
        x = torch.randn(tokens, COLUMNS, generator=generator).bfloat16()
        runs = {name: (lambda calls=calls: [call(x) for call in calls]) for name, calls in kernels.items()}
        samples = alternate(runs, repeats)
        for name in kernels:
            milliseconds[name][str(tokens)] = median(samples[name]) / count * 1e3
    return {
        "kernel_shape": [ROWS, COLUMNS],
        "kernel_threads": threads,
        "kernel_group_size": group_size,
        "kernel_ms": milliseconds,
    }


def _on_avx2_path(matmul, x: torch.Tensor) -> torch.Tensor:
    with native_int4.AVX512_SWITCH.turned_off():
        return matmul(x)


def format_kernel_table(result: dict) -> str:
    times = result["kernel_ms"]
    rows, columns = result["kernel_shape"]
    lines = [
        f"one [{rows}, {columns}] matmul, ms (threads: {result['kernel_threads']}, int4 group size: {result['kernel_group_size']})",
        f"{'M':>3} " + " ".join(f"{name:>12}" for name in times) + "   bf16/int4 for each int4 kernel",
    ]
    for tokens in times["bf16"]:
        speedups = "  ".join(f"{times['bf16'][tokens] / times[name][tokens]:.2f}x" for name in times if name != "bf16")
        lines.append(f"{tokens:>3} " + " ".join(f"{times[name][tokens]:>12.3f}" for name in times) + f"   {speedups}")
    return "\n".join(lines)
