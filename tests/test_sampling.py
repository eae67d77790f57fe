"""Sampling filters and generation: greedy equals transformers, seeds reproduce, stops stop."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from moeplex.model.generate import generate
from moeplex.model.runtime import load_model
from moeplex.model.sampling import SamplingParams, filter_logits, make_generator, sample_token


def test_top_k_and_top_p_keep_only_the_best_tokens():
    logits = torch.randn(50) * 3
    ranked = torch.argsort(logits, descending=True).tolist()
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_k=5))).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(ranked[:5])

    probs = torch.softmax(logits, -1)
    nucleus = torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.7))).nonzero().flatten().tolist()
    mass_before_last = probs[ranked[: len(nucleus) - 1]].sum()
    assert sorted(nucleus) == sorted(ranked[: len(nucleus)])
    assert probs[nucleus].sum() >= 0.7 > mass_before_last


def test_seeded_sampling_reproduces_and_respects_top_k():
    logits = torch.randn(100)
    params = SamplingParams(temperature=1.3, top_k=4, seed=1234)
    first = [sample_token(logits, params, g) for g in [make_generator(params)] for _ in range(30)]
    second = [sample_token(logits, params, g) for g in [make_generator(params)] for _ in range(30)]
    assert first == second
    assert set(first) <= set(torch.topk(logits, 4).indices.tolist())
    assert len(set(first)) > 1


def test_greedy_is_argmax_and_bad_params_are_rejected():
    logits = torch.randn(64)
    assert sample_token(logits, SamplingParams(temperature=0), None) == int(logits.argmax())
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_greedy_generation_matches_transformers_generate(hf_checkpoint):
    name, folder, hf_model = hf_checkpoint
    model = load_model(folder, dtype=torch.float32)
    vocab = hf_model.config.vocab_size
    prompts = [torch.randint(2, vocab, (n,)).tolist() for n in (4, 10)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ours = generate(model, prompts, params)
    for prompt, completion in zip(prompts, ours):
        with torch.no_grad():
            reference = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(prompt) :].tolist()
        assert completion.token_ids == reference, name
        assert completion.finish_reason == "length"


def char_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One character per token id, so every generated id shows up in the text."""
    vocab = {chr(0x4E00 + i): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=chr(0x4E00)))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_stop_strings_truncate_and_finish_with_stop(hf_checkpoint):
    name, folder, hf_model = hf_checkpoint
    model = load_model(folder, dtype=torch.float32)
    tokenizer = char_tokenizer(hf_model.config.vocab_size)
    prompt = torch.randint(0, hf_model.config.vocab_size, (6,)).tolist()
    free = generate(model, [prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), tokenizer)[0]
    assert len(free.text) == 10
    stop = free.text[4:6]
    stopped = generate(
        model, [prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=(stop,)), tokenizer
    )[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
