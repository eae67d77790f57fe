"""`moeplex bench quant`: decode tokens/s with every expert int4 / int8 against every expert bf16, all resident.

One model is loaded in bf16; the int8 and int4 models share its backbone and hold quantized copies of its
experts (where moeplex's native int4 kernel is built, a second int4 model runs the int4 kernel that int4
itself does not use here: `moeplex.quant.kernels.uses_native_int4`).
All decode the same prompt greedily at batch 1, alternating after a warm-up, under one thread count;
decode time is a full run's median minus a prefill-only run's median.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moeplex.bench.decode import weight_bytes_per_token
from moeplex.bench.measure import alternate, median, streaming_bandwidth
from moeplex.model.generate import generate
from moeplex.model.runtime import MoEModel, load_model
from moeplex.model.sampling import SamplingParams
from moeplex.quant import native_int4
from moeplex.quant.apply import quantize_model_experts
from moeplex.quant.bench_options import QuantBenchSettings
from moeplex.quant.formats import QUANTIZED, UNQUANTIZED
from moeplex.quant.kernels import int4_kernel_name, native_int4_forced, uses_native_int4

TORCH_INT4 = "int4-torch"  # all experts int4 through torch's kernel, where int4 itself runs moeplex's native one
NATIVE_INT4 = "int4-native"  # all experts int4 through moeplex's native kernel, where int4 itself runs torch's


def expert_bytes_per_token(model: MoEModel) -> float:
    """Expert bytes one token streams decoding at batch 1: top_k experts of each sparse layer, all one precision."""
    spec = model.spec
    sparse_layers = sum(spec.sparse_layers)
    return spec.top_k * sparse_layers * model.experts.nbytes / (sparse_layers * spec.num_experts)


def run_quant_benchmark(checkpoint: Path, settings: QuantBenchSettings, progress=print) -> dict:
    torch.set_num_threads(settings.threads)
    progress(f"loading {checkpoint} (bf16) and quantizing every expert to int8 and to int4")
    base = load_model(checkpoint, dtype=torch.bfloat16, progress=True)
    spec = base.spec
    positions = [(layer, e) for layer, sparse in enumerate(spec.sparse_layers) if sparse for e in range(spec.num_experts)]
    models = {UNQUANTIZED: base}
    for precision in reversed(QUANTIZED):  # int8, int4
        models[precision] = quantize_model_experts(base, dict.fromkeys(positions, precision), settings.group_size)
    if native_int4.available():  # beside int4 (the kernel `uses_native_int4` picks here), the other int4 kernel on the same experts
        other, block = (TORCH_INT4, native_int4.SWITCH.turned_off) if uses_native_int4(settings.group_size) else (NATIVE_INT4, native_int4_forced)
        with block():
            models[other] = quantize_model_experts(base, dict.fromkeys(positions, "int4"), settings.group_size)
    generator = torch.Generator().manual_seed(settings.seed)
    prompts = torch.randint(3, spec.vocab_size, (1, settings.prompt_tokens), generator=generator).tolist()
    bandwidth = streaming_bandwidth()

    progress(f"timing {settings.repeats} alternating runs of {settings.new_tokens} tokens per precision")
    runs = {}
    for precision, model in models.items():
        runs[f"{precision}:full"] = _generate_run(model, prompts, settings.new_tokens)
        runs[f"{precision}:prefill"] = _generate_run(model, prompts, 1)
    samples = alternate(runs, settings.repeats)

    backbone_bytes = weight_bytes_per_token(base, prompts, settings.new_tokens) - expert_bytes_per_token(base)
    result = {
        "model": str(checkpoint),
        "threads": settings.threads,
        "new_tokens": settings.new_tokens,
        "prompt_tokens": settings.prompt_tokens,
        "group_size": settings.group_size,
        "int4_kernel": int4_kernel_name(settings.group_size),
        "stream_bandwidth_gb_s": bandwidth / 1e9,
        "tokens_per_s": {},
        "expert_bytes": {},
        "expert_bytes_per_token": {},
        "weight_bytes_per_token": {},
        "roofline_fraction": {},
        "greedy_agreement_vs_bf16": {},
    }
    reference_tokens = _greedy_tokens(base, prompts, settings.new_tokens)
    for precision, model in models.items():
        seconds = median(samples[f"{precision}:full"]) - median(samples[f"{precision}:prefill"])
        tokens_per_s = (settings.new_tokens - 1) / seconds
        per_token = backbone_bytes + expert_bytes_per_token(model)
        result["tokens_per_s"][precision] = tokens_per_s
        result["expert_bytes"][precision] = model.experts.nbytes
        result["expert_bytes_per_token"][precision] = expert_bytes_per_token(model)
        result["weight_bytes_per_token"][precision] = per_token
        result["roofline_fraction"][precision] = per_token * tokens_per_s / bandwidth
        result["greedy_agreement_vs_bf16"][precision] = _agreement(
            _greedy_tokens(model, prompts, settings.new_tokens), reference_tokens
        )
    for precision in set(models) - {UNQUANTIZED}:
        result[f"{precision}_speedup_vs_bf16"] = result["tokens_per_s"][precision] / result["tokens_per_s"][UNQUANTIZED]
    return result


def _generate_run(model: MoEModel, prompts: list[list[int]], new_tokens: int):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return lambda: generate(model, prompts, params)


def _greedy_tokens(model: MoEModel, prompts: list[list[int]], new_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    return generate(model, prompts, params)[0].token_ids


def _agreement(tokens: list[int], reference: list[int]) -> float:
    """Fraction of greedy tokens equal to the reference's up to the first divergence."""
    agreed = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
    return agreed / len(reference)


def format_table(result: dict) -> str:
    lines = [
        f"model: {result['model']}, threads: {result['threads']}, int4 group size: {result['group_size']}, "
        f"int4 kernel: {result.get('int4_kernel', 'torch')}, "
        f"stream bandwidth: {result['stream_bandwidth_gb_s']:.1f} GB/s, batch 1",
        f"{'experts':>10} {'tok/s':>7} {'speedup':>8} {'expert MB':>10} {'expert MB/tok':>14} {'MB/tok':>7} {'roofline':>9} {'agree':>6}",
    ]
    for precision, tokens_per_s in result["tokens_per_s"].items():
        speedup = result.get(f"{precision}_speedup_vs_bf16", 1.0)
        lines.append(
            f"{precision:>10} {tokens_per_s:>7.1f} {speedup:>7.2f}x {result['expert_bytes'][precision] / 1e6:>10.1f}"
            f" {result['expert_bytes_per_token'][precision] / 1e6:>14.1f} {result['weight_bytes_per_token'][precision] / 1e6:>7.1f}"
            f" {result['roofline_fraction'][precision]:>9.0%} {result['greedy_agreement_vs_bf16'][precision]:>6.0%}"
        )
    return "\n".join(lines)
