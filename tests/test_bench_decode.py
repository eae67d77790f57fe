"""`moeplex bench decode` end to end on a tiny checkpoint: every reported number is there, the byte count is exact."""

from __future__ import annotations

import json

import torch

from moeplex.bench.decode import weight_bytes_per_token
from moeplex.cli import main
from moeplex.model.runtime import load_model
from tests.conftest import saved_random_model


def test_bytes_per_token_at_batch_one_is_the_backbone_plus_top_k_experts_per_layer(tmp_path):
    saved_random_model(tmp_path, seed=3)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    spec = model.spec
    prompt = torch.randint(3, spec.vocab_size, (1, 5), generator=torch.Generator().manual_seed(11)).tolist()
    embedding = 0 if spec.tie_word_embeddings else model.backbone.embed.numel() * 2
    expected = model.backbone.nbytes - embedding + spec.num_layers * spec.top_k * spec.expert_numel * 2
    assert weight_bytes_per_token(model, prompt, new_tokens=4) == expected


def test_bench_decode_writes_every_number_and_a_profile(tmp_path, capsys):
    saved_random_model(tmp_path / "model", seed=5)
    out = tmp_path / "decode.json"
    args = ["bench", "decode", "--model", str(tmp_path / "model"), "--batch-sizes", "1", "2", "--new-tokens", "4",
            "--repeats", "1", "--threads", "1", "--profile", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    for key in ("tokens_per_s", "speedup_vs_transformers", "roofline_fraction", "bytes_per_token", "greedy_agreement"):
        assert set(result[key] if key != "tokens_per_s" else result[key]["moeplex"]) == {"1", "2"}, key
    assert all(value > 0 for system in result["tokens_per_s"].values() for value in system.values())
    assert result["bytes_per_token"]["2"] < result["bytes_per_token"]["1"]  # the backbone is shared by the batch
    assert all(0 <= value <= 1 for value in result["greedy_agreement"].values())
    profile = result["profile"]
    assert profile["batch"] == 1 and 0 < len(profile["top_ops"]) <= 12
    shares = [row["share"] for row in profile["top_ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert "decode profile at batch 1" in capsys.readouterr().out
