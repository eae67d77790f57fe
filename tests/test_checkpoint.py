"""Checkpoint folders in every layout transformers produces, and clear errors for broken ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from moeplex.checkpoint import CheckpointReader
from moeplex.errors import CheckpointError, UnsupportedModelError
from moeplex.model.attention import SequenceChunk
from moeplex.model.runtime import load_model


def logits_of(folder, prompt):
    model = load_model(folder, dtype=torch.float32)
    return model.forward(prompt, [SequenceChunk(model.new_cache(), 0, len(prompt))], all_logits=True)


def test_transformers_saves_per_expert_keys(hf_checkpoint):
    _, folder, _ = hf_checkpoint
    keys = CheckpointReader(folder).keys()
    assert any(".experts.0." in k for k in keys)
    assert not any(k.endswith("gate_up_proj") for k in keys)


def test_fused_expert_layout_gives_the_same_logits(hf_checkpoint, tmp_path):
    name, folder, hf_model = hf_checkpoint
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(folder / "config.json", fused / "config.json")
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state), "in-memory layout should be fused"
    save_file(state, str(fused / "model.safetensors"))
    prompt = torch.randint(0, hf_model.config.vocab_size, (7,))
    torch.testing.assert_close(logits_of(fused, prompt), logits_of(folder, prompt), rtol=0, atol=0)


def test_sharded_checkpoint_with_index(hf_checkpoint, tmp_path):
    name, folder, hf_model = hf_checkpoint
    hf_model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    prompt = torch.randint(0, hf_model.config.vocab_size, (5,))
    torch.testing.assert_close(logits_of(tmp_path, prompt), logits_of(folder, prompt), rtol=0, atol=0)


def test_missing_shard_names_the_file(hf_checkpoint, tmp_path):
    _, _, hf_model = hf_checkpoint
    hf_model.save_pretrained(tmp_path, max_shard_size="60KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(tmp_path)


def test_unknown_architecture_is_rejected(hf_checkpoint, tmp_path):
    _, folder, _ = hf_checkpoint
    shutil.copytree(folder, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model_type"] = "not_a_moe"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="not_a_moe"):
        load_model(tmp_path / "ckpt")


def test_shape_mismatch_names_file_and_key(hf_checkpoint, tmp_path):
    _, folder, _ = hf_checkpoint
    shutil.copytree(folder, tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 2 * config["hidden_size"]
    config.pop("head_dim", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .model\.\S+. has shape"):
        load_model(tmp_path / "ckpt")


def test_missing_tensor_and_missing_folder(hf_checkpoint, tmp_path):
    _, folder, hf_model = hf_checkpoint
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if "layers.1.input_layernorm" not in k}
    (tmp_path / "ckpt").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "ckpt")
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.1.input_layernorm"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")


def test_reading_one_expert_touches_only_that_expert(hf_checkpoint):
    from moeplex.model.weights import open_checkpoint

    name, folder, hf_model = hf_checkpoint
    family, reader, spec = open_checkpoint(folder)
    layer = spec.sparse_layers.index(True)
    expert = family.read_expert(reader, spec, layer, spec.num_experts - 1)
    reference = dict(hf_model.named_parameters())
    prefix = f"model.layers.{layer}.mlp.experts."
    torch.testing.assert_close(expert["gate_up"], reference[prefix + "gate_up_proj"][-1])
    torch.testing.assert_close(expert["down"], reference[prefix + "down_proj"][-1])
