"""Logit parity with transformers for every family: prefill plus 20 cached greedy decode steps."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from moeplex.model.attention import SequenceChunk
from moeplex.model.runtime import load_model

DECODE_STEPS = 20


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def test_prefill_and_cached_decode_match_transformers(hf_checkpoint):
    name, folder, hf_model = hf_checkpoint
    model = load_model(folder, dtype=torch.float32)
    prompt = torch.randint(0, hf_model.config.vocab_size, (11,))

    cache = model.new_cache()
    ours = model.forward(prompt, [SequenceChunk(cache, 0, len(prompt))], all_logits=True)
    hf_cache = DynamicCache(config=hf_model.config)
    with torch.no_grad():
        reference = hf_model(prompt[None], past_key_values=hf_cache, use_cache=True).logits[0]
    assert relative_error(ours, reference) <= 1e-4, name

    for step in range(DECODE_STEPS):
        reference_token = int(reference[-1].argmax())
        assert int(ours[-1].argmax()) == reference_token, f"{name}: greedy token differs at step {step}"
        token = torch.tensor([reference_token])
        ours = model.forward(token, [SequenceChunk(cache, cache.length, 1)])
        with torch.no_grad():
            reference = hf_model(token[None], past_key_values=hf_cache, use_cache=True).logits[0]
        assert relative_error(ours, reference) <= 1e-4, f"{name}: decode step {step}"


def test_batch_of_different_lengths_equals_each_alone(hf_checkpoint):
    name, folder, hf_model = hf_checkpoint
    model = load_model(folder, dtype=torch.float32)
    prompts = [torch.randint(0, hf_model.config.vocab_size, (n,)) for n in (3, 9, 6)]

    alone = [model.forward(p, [SequenceChunk(model.new_cache(), 0, len(p))]) for p in prompts]
    caches = [model.new_cache() for _ in prompts]
    batched = model.forward(torch.cat(prompts), [SequenceChunk(c, 0, len(p)) for c, p in zip(caches, prompts)])
    for row, logits in enumerate(alone):
        assert relative_error(batched[row : row + 1], logits) <= 1e-5, name
