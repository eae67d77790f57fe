"""Qwen3-MoE: per-head RMSNorm on q and k, no shared expert, optional top-k renormalization."""

from moeplex.families.base import Family, common_spec_fields, sparse_layer_pattern
from moeplex.families.llama_keys import llama_backbone_keys
from moeplex.families.qwen_style import QWEN_STYLE_EXPERT_KEYS, num_experts
from moeplex.model.spec import ModelSpec


def spec_from_config(config: dict) -> ModelSpec:
    bias = bool(config.get("attention_bias", False))
    return ModelSpec(
        **common_spec_fields(config, "qwen3_moe"),
        num_experts=num_experts(config),
        top_k=config["num_experts_per_tok"],
        expert_intermediate_size=config["moe_intermediate_size"],
        attention_bias=bias,
        output_bias=bias,
        qk_norm="head",
        normalize_top_k=bool(config.get("norm_topk_prob", False)),
        sparse_layers=sparse_layer_pattern(config),
        dense_intermediate_size=config["intermediate_size"],
    )


FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    spec_from_config=spec_from_config,
    backbone_keys=llama_backbone_keys(moe_prefixes=("mlp",)),
    expert_keys=QWEN_STYLE_EXPERT_KEYS,
    hf_architecture="Qwen3MoeForCausalLM",
)
