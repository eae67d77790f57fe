"""LLM: the Python API over a store: batch generate for any variant, and async streaming."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from moeplex.engine.config import EngineConfig
from moeplex.engine.engine import Engine
from moeplex.engine.loop import EngineLoop
from moeplex.engine.outputs import RequestOutput
from moeplex.model.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """Every variant of a store served from one engine running in a background thread.

    For example `LLM("store", max_num_seqs=8).generate(["def main():"], variant="python")[0].text`.
    """

    def __init__(self, store: str | Path, config: EngineConfig | None = None, **config_overrides):
        self.engine = Engine(store, config or EngineConfig(**config_overrides))
        self.loop = EngineLoop(self.engine)

    @property
    def variants(self) -> list[str]:
        return self.engine.variants

    def parent_of(self, variant: str) -> str | None:
        """The model a variant was fine-tuned from (None for the base itself or when the family has no base)."""
        return None if variant == self.engine.base else self.engine.base

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("the store has no tokenizer; pass prompts as token ids")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(prompt)

    def generate(
        self, prompts: Prompt | list[Prompt], variant: str | None = None, sampling: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """Complete every prompt with the variant (default: the store's first) and wait for all of them."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            return []
        variant = variant or self.variants[0]
        sampling = sampling or SamplingParams()
        results: dict[int, RequestOutput] = {}
        done = threading.Event()
        lock = threading.Lock()
        expected = len(prompts)

        def on_output(output: RequestOutput) -> None:
            if output.finished:
                with lock:
                    results[output.seq_id] = output
                    if len(results) == expected:
                        done.set()

        seq_ids = [self.loop.submit(variant, self.encode(p), sampling, on_output) for p in prompts]
        done.wait()
        return [results[seq_id] for seq_id in seq_ids]

    async def stream(
        self, prompt: Prompt, variant: str | None = None, sampling: SamplingParams | None = None, logprobs: int | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the sequence's output after every new token; leaving early cancels it and frees its cache."""
        event_loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def on_output(output: RequestOutput) -> None:
            if not event_loop.is_closed():
                event_loop.call_soon_threadsafe(outputs.put_nowait, output)

        seq_id = self.loop.submit(variant or self.variants[0], self.encode(prompt), sampling or SamplingParams(), on_output, logprobs)
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.loop.abort(seq_id)

    def set_expert_budget(self, nbytes: int) -> None:
        """Grow or shrink the device bytes for experts while requests run (see Engine.set_expert_budget)."""
        self.loop.call(lambda engine: engine.set_expert_budget(nbytes))

    def close(self, drain_timeout: float | None = None) -> None:
        """Finish (or after drain_timeout seconds abort) what is running, then stop the engine thread."""
        self.loop.stop(drain_timeout)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
