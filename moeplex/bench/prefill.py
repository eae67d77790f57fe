"""`moeplex bench prefill`: prompt processing time in bf16, with and without fp32 matmuls where bf16 is emulated.

One model, loaded once in bf16, prefills the same random prompt (batch 1, one generated token) with
`moeplex.model.bf16_upcast` on and inside `SWITCH.turned_off()`, alternating after a warm-up, at each prompt
length; the table gives medians and their ratio. On a CPU with bf16 instructions both rows run the same
code (the JSON says whether this machine emulates bf16), unless `as_if_emulated` makes it upcast as if
it did (`bf16_upcast.assumed_emulated`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moeplex.bench.measure import alternate, median
from moeplex.model import bf16_upcast
from moeplex.model.generate import generate
from moeplex.model.runtime import load_model
from moeplex.model.sampling import SamplingParams


@dataclass(frozen=True)
class PrefillSettings:
    prompt_tokens: tuple[int, ...] = (32, 256)
    repeats: int = 5
    threads: int = 2
    seed: int = 0
    as_if_emulated: bool = False


def run_prefill_benchmark(checkpoint: Path, settings: PrefillSettings) -> dict:
    torch.set_num_threads(settings.threads)
    model = load_model(checkpoint, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(settings.seed)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def with_upcast(prompts):
        return lambda: generate(model, prompts, params)

    def without_upcast(prompts):
        def run():
            with bf16_upcast.SWITCH.turned_off():
                generate(model, prompts, params)
        return run

    seconds = {"fp32_matmuls": {}, "bf16_matmuls": {}}
    for tokens in settings.prompt_tokens:
        prompts = torch.randint(3, model.spec.vocab_size, (1, tokens), generator=generator).tolist()
        with bf16_upcast.assumed_emulated(settings.as_if_emulated):
            samples = alternate({"fp32_matmuls": with_upcast(prompts), "bf16_matmuls": without_upcast(prompts)}, settings.repeats)
        for name, values in samples.items():
            seconds[name][str(tokens)] = median(values)
    return {
        "model": str(checkpoint),
        "threads": settings.threads,
        "bf16_emulated": bf16_upcast.bf16_matmul_is_emulated(),
        "as_if_emulated": settings.as_if_emulated,
        "prefill_seconds": seconds,
        "speedup": {tokens: seconds["bf16_matmuls"][tokens] / seconds["fp32_matmuls"][tokens] for tokens in seconds["bf16_matmuls"]},
    }


def format_table(result: dict) -> str:
    seconds = result["prefill_seconds"]
    lines = [
        f"model: {result['model']}, threads: {result['threads']}, bf16 emulated on this CPU: {result['bf16_emulated']}"
        f"{' (upcasting as if it were)' if result['as_if_emulated'] else ''}, batch 1",
        f"{'prompt':>7} {'fp32 matmuls ms':>16} {'bf16 matmuls ms':>16} {'speedup':>8}",
    ]
    for tokens, speedup in result["speedup"].items():
        lines.append(f"{tokens:>7} {seconds['fp32_matmuls'][tokens] * 1e3:>16.1f} {seconds['bf16_matmuls'][tokens] * 1e3:>16.1f} {speedup:>7.2f}x")
    return "\n".join(lines)
