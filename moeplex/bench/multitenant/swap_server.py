"""Whole-model swapping baseline: one process, one model resident; loads the requested variant's checkpoint when the variant changes."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer

from moeplex.bench.multitenant.openai_app import baseline_server_main
from moeplex.dtypes import resolve_dtype
from moeplex.model.generate import generate
from moeplex.model.runtime import MoEModel, load_model
from moeplex.model.sampling import SamplingParams


class TokenTap:
    """Stands in for a model in `generate` and reports each sampled token as the next step consumes it."""

    def __init__(self, model: MoEModel, on_token: Callable[[int], None]):
        self.model, self.on_token, self.steps = model, on_token, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, token_ids, chunks, all_logits=False):
        if self.steps:  # a decode step's input is the token sampled by the step before
            self.on_token(int(token_ids[0]))
        self.steps += 1
        return self.model.forward(token_ids, chunks, all_logits)


class SwappingBackend:
    """FCFS over the variants' full checkpoints with the moeplex runtime; a variant change drops the model and loads the other."""

    def __init__(self, checkpoints: dict[str, Path], tokenizer: Path, dtype: str):
        self.checkpoints = checkpoints
        self.variants = list(checkpoints)
        self.dtype = resolve_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.resident: tuple[str, MoEModel] | None = None
        self.swaps, self.swap_seconds = 0, 0.0

    def model_for(self, variant: str) -> MoEModel:
        if self.resident is None or self.resident[0] != variant:
            started = time.perf_counter()
            self.resident = None
            gc.collect()
            self.resident = (variant, load_model(self.checkpoints[variant], dtype=self.dtype))
            self.swaps += 1
            self.swap_seconds += time.perf_counter() - started
        return self.resident[1]

    def generate(self, variant: str, prompt_ids: list[int], max_tokens: int, ignore_eos: bool, on_token: Callable[[int], None]) -> None:
        tap = TokenTap(self.model_for(variant), on_token)
        completion = generate(tap, [prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos))[0]
        for token in completion.token_ids[tap.steps - 1 :]:  # the last sampled token was never fed back
            on_token(token)


if __name__ == "__main__":
    baseline_server_main("Whole-model swapping baseline server (FCFS, one model resident).", SwappingBackend)
