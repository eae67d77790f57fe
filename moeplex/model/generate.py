"""Batched generation on one model: prefill every prompt, then decode all live sequences together."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeplex.model.attention import SequenceChunk
from moeplex.model.kv_cache import SequenceKVCache
from moeplex.model.runtime import MoEModel
from moeplex.model.sampling import SamplingParams, make_generator, sample_token
from moeplex.model.stopping import Completion, append_token


@dataclass
class _Sequence:
    completion: Completion
    params: SamplingParams
    cache: SequenceKVCache
    generator: torch.Generator | None

    @property
    def finished(self) -> bool:
        return self.completion.finish_reason is not None


def generate(
    model: MoEModel,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    tokenizer=None,
) -> list[Completion]:
    """Generate for every prompt; stop strings need the tokenizer (for text) and truncate it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    sequences = [
        _Sequence(Completion(list(p)), sp, model.new_cache(len(p) + sp.max_tokens), make_generator(sp))
        for p, sp in zip(prompts, params_list)
    ]
    eos_ids = set(model.spec.eos_token_ids)
    live = sequences
    step_tokens = [seq.completion.prompt_ids for seq in live]
    while live:
        chunks = [SequenceChunk(s.cache, s.cache.length, len(t)) for s, t in zip(live, step_tokens)]
        flat = torch.tensor([tok for tokens in step_tokens for tok in tokens], dtype=torch.long)
        logits = model.forward(flat, chunks)  # [len(live), V]
        for row, seq in enumerate(live):
            token = sample_token(logits[row], seq.params, seq.generator)
            append_token(seq.completion, seq.params, token, eos_ids, tokenizer)
        live = [s for s in live if not s.finished]
        step_tokens = [[s.completion.token_ids[-1]] for s in live]
    return [s.completion for s in sequences]
