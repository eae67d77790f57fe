"""Transformers baseline: every variant loaded with AutoModelForCausalLM, requests served one at a time with `generate`, as a user would write it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from moeplex.bench.multitenant.openai_app import baseline_server_main
from moeplex.dtypes import resolve_dtype


class TokenStreamer(BaseStreamer):
    """Forwards each generated token id to a callback (the first put is the prompt)."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.on_token(token)

    def end(self) -> None:
        pass


class TransformersBackend:
    def __init__(self, checkpoints: dict[str, Path], tokenizer: Path, dtype: str):
        torch_dtype = resolve_dtype(dtype)
        self.variants = list(checkpoints)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.models = {name: AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval() for name, folder in checkpoints.items()}

    def generate(self, variant: str, prompt_ids: list[int], max_tokens: int, ignore_eos: bool, on_token: Callable[[int], None]) -> None:
        model = self.models[variant]
        with torch.inference_mode():
            model.generate(
                torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), max_new_tokens=max_tokens,
                min_new_tokens=max_tokens if ignore_eos else None, do_sample=False, streamer=TokenStreamer(on_token),
                pad_token_id=model.generation_config.eos_token_id,
            )


if __name__ == "__main__":
    baseline_server_main("Transformers baseline server (one model per variant, FCFS).", TransformersBackend)
