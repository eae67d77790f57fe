"""Perplexity through our runtime agrees with transformers on the same model and text."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeplex.eval.perplexity import (
    runtime_logits,
    transformers_logits,
    window_log_probs,
    windowed_perplexity,
    windowed_ppl_and_kl,
)
from moeplex.model.runtime import load_model


def test_runtime_perplexity_matches_transformers(hf_checkpoint):
    """fp32 here; bf16 agreement is checked on the trained demo family (tests/test_demo_quality.py),
    because on random weights bf16 rounding flips near-tied routing decisions."""
    dtype = torch.float32
    name, folder, _ = hf_checkpoint
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    model = load_model(folder, dtype=dtype)
    ids = torch.randint(0, reference.config.vocab_size, (300,))
    ours = windowed_perplexity(runtime_logits(model), ids, window=64)
    theirs = windowed_perplexity(transformers_logits(reference), ids, window=64)
    assert abs(ours / theirs - 1) <= 0.005, (name, ours, theirs)


def test_perplexity_of_a_known_distribution():
    vocab = 10
    uniform = windowed_perplexity(lambda ids: torch.zeros(len(ids), vocab), torch.randint(0, vocab, (50,)), window=7)
    assert math.isclose(uniform, vocab, rel_tol=1e-5)
    with pytest.raises(ValueError):
        windowed_perplexity(lambda ids: torch.zeros(len(ids), vocab), torch.tensor([3]))


def test_kl_to_a_reference_is_zero_for_itself_and_matches_the_closed_form():
    vocab, generator = 12, torch.Generator().manual_seed(5)
    table = torch.randn(vocab, vocab, generator=generator)
    noise = torch.randn(vocab, vocab, generator=generator)
    reference_of, perturbed_of = (lambda ids: table[ids]), (lambda ids: (table + 0.3 * noise)[ids])
    ids = torch.randint(0, vocab, (40,), generator=generator)
    reference = window_log_probs(reference_of, ids, window=9)
    ppl, kl = windowed_ppl_and_kl(reference_of, ids, reference, window=9)
    assert math.isclose(ppl, windowed_perplexity(reference_of, ids, window=9), rel_tol=1e-6) and abs(kl) < 1e-6
    ppl, kl = windowed_ppl_and_kl(perturbed_of, ids, reference, window=9)
    p, q = torch.log_softmax(table[ids[:-1]], -1), torch.log_softmax((table + 0.3 * noise)[ids[:-1]], -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())  # every token but the last is predicted once
    assert math.isclose(ppl, windowed_perplexity(perturbed_of, ids, window=9), rel_tol=1e-6)
    assert kl > 0 and math.isclose(kl, expected, rel_tol=1e-4)
