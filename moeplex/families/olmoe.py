"""OLMoE: RMSNorm over the whole q and k projections, optional qkv clipping, no shared expert."""

from moeplex.families.base import Family, common_spec_fields
from moeplex.families.llama_keys import llama_backbone_keys
from moeplex.families.qwen_style import QWEN_STYLE_EXPERT_KEYS, num_experts
from moeplex.model.spec import ModelSpec


def spec_from_config(config: dict) -> ModelSpec:
    bias = bool(config.get("attention_bias", False))
    fields = common_spec_fields(config, "olmoe")
    fields["sliding_window"] = None  # OLMoE attends over the whole context
    return ModelSpec(
        **fields,
        num_experts=num_experts(config),
        top_k=config["num_experts_per_tok"],
        expert_intermediate_size=config["intermediate_size"],
        attention_bias=bias,
        output_bias=bias,
        qk_norm="full",
        clip_qkv=config.get("clip_qkv"),
        normalize_top_k=bool(config.get("norm_topk_prob", False)),
    )


FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    spec_from_config=spec_from_config,
    backbone_keys=llama_backbone_keys(moe_prefixes=("mlp",)),
    expert_keys=QWEN_STYLE_EXPERT_KEYS,
    hf_architecture="OlmoeForCausalLM",
)
