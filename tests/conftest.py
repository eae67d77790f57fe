"""Shared fixtures: small random Hugging Face MoE checkpoints of each family, saved locally; a Python without a C compiler."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers

torch.set_num_threads(2)

TINY = dict(vocab_size=160, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def family_configs() -> dict[str, transformers.PretrainedConfig]:
    """One small config per family, exercising each family's distinctive options."""
    return {
        "mixtral": transformers.MixtralConfig(
            **TINY, intermediate_size=96, num_local_experts=6, num_experts_per_tok=2, rope_theta=5000.0
        ),
        "qwen2_moe": transformers.Qwen2MoeConfig(
            **TINY,
            intermediate_size=112,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        ),
        "qwen3_moe": transformers.Qwen3MoeConfig(
            **TINY, intermediate_size=112, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=3,
            norm_topk_prob=True, head_dim=24,
        ),
        "olmoe": transformers.OlmoeConfig(
            **TINY, intermediate_size=48, num_experts=8, num_experts_per_tok=2, clip_qkv=4.0, pad_token_id=0,
            eos_token_id=1,
        ),
    }


def make_hf_model(config: transformers.PretrainedConfig, seed: int) -> transformers.PreTrainedModel:
    """A randomly initialized causal LM with weights scaled up so the test sees non-trivial routing."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.15 if param.dim() > 1 else 0.05)
            else:
                param.uniform_(0.8, 1.2)
    return model


def saved_random_model(folder, family: str = "mixtral", seed: int = 0):
    """Save a random model of the family (make_hf_model) as a checkpoint folder; returns the folder."""
    make_hf_model(family_configs()[family], seed=seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=sorted(family_configs()))
def hf_checkpoint(request, tmp_path_factory):
    """(family name, checkpoint folder, transformers model) for each family, saved per-expert."""
    name = request.param
    model = make_hf_model(family_configs()[name], seed=hash(name) % 1000)
    folder = tmp_path_factory.mktemp(f"ckpt_{name}")
    model.save_pretrained(folder)
    return name, folder, model


@pytest.fixture
def python_without_compiler(tmp_path):
    """Runs a script in a fresh Python whose C compiler is missing and whose cache is empty; returns its stdout."""
    environment = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "MOEPLEX_CACHE": str(tmp_path / "cache")}

    def run(script: str) -> str:
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True).stdout

    return run
