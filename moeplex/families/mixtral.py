"""Mixtral: softmax top-k router with renormalized weights, experts w1 (gate), w3 (up), w2 (down)."""

from moeplex.families.base import ExpertKeys, Family, common_spec_fields
from moeplex.families.llama_keys import LAYER, fused_expert_keys, llama_backbone_keys
from moeplex.model.spec import ModelSpec


def spec_from_config(config: dict) -> ModelSpec:
    return ModelSpec(
        **common_spec_fields(config, "mixtral"),
        num_experts=config["num_local_experts"],
        top_k=config["num_experts_per_tok"],
        expert_intermediate_size=config["intermediate_size"],
        normalize_top_k=True,
    )


_fused_gate_up, _fused_down = fused_expert_keys("mlp")

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    spec_from_config=spec_from_config,
    # transformers saves "block_sparse_moe"; its in-memory (fused) state dict says "mlp".
    backbone_keys=llama_backbone_keys(moe_prefixes=("block_sparse_moe", "mlp")),
    expert_keys=ExpertKeys(
        per_expert=(
            f"{LAYER}.block_sparse_moe.experts.{{e}}.{{proj}}.weight",
            f"{LAYER}.mlp.experts.{{e}}.{{proj}}.weight",
        ),
        proj_names={"gate": "w1", "up": "w3", "down": "w2"},
        fused_gate_up=_fused_gate_up,
        fused_down=_fused_down,
    ),
    hf_architecture="MixtralForCausalLM",
)
