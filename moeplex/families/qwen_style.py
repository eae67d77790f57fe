"""Expert key layout shared by Qwen2-MoE, Qwen3-MoE and OLMoE (mlp.experts.E.{gate,up,down}_proj)."""

from moeplex.families.base import ExpertKeys
from moeplex.families.llama_keys import LAYER, fused_expert_keys

_fused_gate_up, _fused_down = fused_expert_keys("mlp")

QWEN_STYLE_EXPERT_KEYS = ExpertKeys(
    per_expert=(f"{LAYER}.mlp.experts.{{e}}.{{proj}}.weight",),
    proj_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    fused_gate_up=_fused_gate_up,
    fused_down=_fused_down,
)


def num_experts(config: dict) -> int:
    """Routed expert count; Qwen3-MoE configs may call it num_local_experts."""
    return config.get("num_experts") or config["num_local_experts"]
