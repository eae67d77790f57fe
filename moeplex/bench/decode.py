"""`moeplex bench decode`: decode tokens/s of our runtime against transformers' generate, and the roofline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from moeplex.bench.measure import alternate, median, streaming_bandwidth
from moeplex.bench.profile import format_profile, profile_decode
from moeplex.dtypes import resolve_dtype
from moeplex.model.experts import ExpertCompute
from moeplex.model.generate import generate
from moeplex.model.runtime import MoEModel, load_model
from moeplex.model.sampling import SamplingParams


class ExpertByteCounter:
    """Wraps an expert door and counts the bytes of distinct experts each call streams."""

    def __init__(self, inner: ExpertCompute, bytes_per_expert: int):
        self.inner, self.bytes_per_expert = inner, bytes_per_expert
        self.bytes = 0

    def __call__(self, layer, hidden, expert_ids, routing_weights):
        self.bytes += int(torch.unique(expert_ids).numel()) * self.bytes_per_expert
        return self.inner(layer, hidden, expert_ids, routing_weights)


@dataclass
class DecodeSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    new_tokens: int = 32
    prompt_tokens: int = 16
    repeats: int = 3
    threads: int = 2
    seed: int = 0
    profile: bool = False  # also profile moeplex's decode at the first batch size
    device: str = "cpu"
    dtype: str = "bf16"  # a moeplex.dtypes name, for both systems


def weight_bytes_per_token(model: MoEModel, prompts: list[list[int]], new_tokens: int) -> float:
    """Weight bytes streamed per generated token while decoding these prompts (backbone + used experts)."""
    spec = model.spec
    counter = ExpertByteCounter(model.experts, spec.expert_numel * model.dtype.itemsize)
    counting = MoEModel(spec, model.backbone, counter, model.dtype, model.device)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    generate(counting, prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    prefill_bytes = counter.bytes
    generate(counting, prompts, params)
    decode_steps = new_tokens - 1
    expert_bytes = (counter.bytes - 2 * prefill_bytes) / decode_steps  # per decode step, all sequences
    embedding = 0 if spec.tie_word_embeddings else model.backbone.embed.numel() * model.dtype.itemsize
    backbone_bytes = model.backbone.nbytes - embedding  # every step reads all of it but the embedding table
    return (backbone_bytes + expert_bytes) / len(prompts)


def run_decode_benchmark(checkpoint: Path, settings: DecodeSettings, progress=print) -> dict:
    torch.set_num_threads(settings.threads)
    dtype = resolve_dtype(settings.dtype)
    progress(f"loading {checkpoint} ({dtype}) into moeplex and transformers on {settings.device}")
    ours = load_model(checkpoint, dtype=dtype, device=settings.device, progress=True)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(settings.device).eval()
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = ours.spec.vocab_size
    bandwidth = streaming_bandwidth(device=settings.device)
    result = {
        "model": str(checkpoint),
        "parameters": sum(p.numel() for p in reference.parameters()),
        "device": settings.device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": settings.threads,
        "new_tokens": settings.new_tokens,
        "prompt_tokens": settings.prompt_tokens,
        "stream_bandwidth_gb_s": bandwidth / 1e9,
        "tokens_per_s": {"moeplex": {}, "transformers": {}},
        "speedup_vs_transformers": {},
        "bytes_per_token": {},
        "roofline_fraction": {},
        "greedy_agreement": {},
    }
    for batch in settings.batch_sizes:
        prompts = torch.randint(3, vocab, (batch, settings.prompt_tokens), generator=generator).to(settings.device)
        progress(f"batch {batch}: timing {settings.repeats} alternating runs of {settings.new_tokens} tokens")
        samples = alternate(_runs(ours, reference, prompts, settings.new_tokens), settings.repeats)
        decoded = batch * (settings.new_tokens - 1)
        for system in ("moeplex", "transformers"):
            seconds = median(samples[f"{system}:full"]) - median(samples[f"{system}:prefill"])
            result["tokens_per_s"][system][str(batch)] = decoded / seconds
        key = str(batch)
        result["speedup_vs_transformers"][key] = result["tokens_per_s"]["moeplex"][key] / result["tokens_per_s"]["transformers"][key]
        per_token = weight_bytes_per_token(ours, prompts.tolist(), settings.new_tokens)
        result["bytes_per_token"][key] = per_token
        result["roofline_fraction"][key] = per_token * result["tokens_per_s"]["moeplex"][key] / bandwidth
        result["greedy_agreement"][key] = _greedy_agreement(ours, reference, prompts, settings.new_tokens)
        if settings.profile and "profile" not in result:
            progress(f"batch {batch}: profiling moeplex's decode")
            result["profile"] = {"batch": batch, "top_ops": profile_decode(ours, prompts.tolist(), settings.new_tokens)}
    return result


def _runs(ours: MoEModel, reference, prompts: torch.Tensor, new_tokens: int) -> dict:
    lists = prompts.tolist()
    mask = torch.ones_like(prompts)

    def ours_run(n):
        return lambda: generate(ours, lists, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    def reference_run(n):
        def run():
            with torch.inference_mode():
                reference.generate(
                    prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )

        return run

    return {
        "moeplex:full": ours_run(new_tokens),
        "moeplex:prefill": ours_run(1),
        "transformers:full": reference_run(new_tokens),
        "transformers:prefill": reference_run(1),
    }


def _greedy_agreement(ours: MoEModel, reference, prompts: torch.Tensor, new_tokens: int) -> float:
    """Fraction of greedy tokens (until the first divergence per sequence) on which both systems agree."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    mine = [c.token_ids for c in generate(ours, prompts.tolist(), params)]
    with torch.inference_mode():
        theirs = reference.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )[:, prompts.shape[1] :].tolist()
    agreed = 0
    for a, b in zip(mine, theirs):
        for x, y in zip(a, b):
            if x != y:
                break
            agreed += 1
    return agreed / (len(mine) * new_tokens)


def format_table(result: dict) -> str:
    lines = [
        f"model: {result['model']} ({result['parameters'] / 1e6:.0f}M parameters, {result.get('dtype', 'bfloat16')}), "
        f"{result.get('device', 'cpu')}, threads: {result['threads']}, stream bandwidth: {result['stream_bandwidth_gb_s']:.1f} GB/s",
        f"{'batch':>5} {'moeplex tok/s':>14} {'transformers tok/s':>19} {'speedup':>8} {'MB/token':>9} {'roofline':>9} {'agree':>6}",
    ]
    for key in result["speedup_vs_transformers"]:
        lines.append(
            f"{key:>5} {result['tokens_per_s']['moeplex'][key]:>14.1f} {result['tokens_per_s']['transformers'][key]:>19.1f}"
            f" {result['speedup_vs_transformers'][key]:>7.2f}x {result['bytes_per_token'][key] / 1e6:>9.1f}"
            f" {result['roofline_fraction'][key]:>9.0%} {result['greedy_agreement'][key]:>6.0%}"
        )
    if "profile" in result:
        lines += [f"moeplex decode profile at batch {result['profile']['batch']} (self CPU time):", format_profile(result["profile"]["top_ops"])]
    return "\n".join(lines)
