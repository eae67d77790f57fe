"""Perplexity through our runtime agrees with transformers on the same model and text."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeplex.eval.perplexity import runtime_logits, transformers_logits, windowed_perplexity
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
