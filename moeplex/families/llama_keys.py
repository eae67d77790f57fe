"""Key names that the Llama-style MoE families share (attention, norms, embeddings)."""

LAYER = "model.layers.{l}"


def llama_backbone_keys(moe_prefixes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Backbone key templates; moe_prefixes are the module names of the MoE block (e.g. "mlp")."""
    keys = {
        "embed": ("model.embed_tokens.weight",),
        "final_norm": ("model.norm.weight",),
        "lm_head": ("lm_head.weight",),
        "layers.{l}.attn_norm": (f"{LAYER}.input_layernorm.weight",),
        "layers.{l}.mlp_norm": (f"{LAYER}.post_attention_layernorm.weight",),
    }
    for proj in ("q", "k", "v", "o"):
        keys[f"layers.{{l}}.{proj}"] = (f"{LAYER}.self_attn.{proj}_proj.weight",)
        keys[f"layers.{{l}}.{proj}_bias"] = (f"{LAYER}.self_attn.{proj}_proj.bias",)
    keys["layers.{l}.q_norm"] = (f"{LAYER}.self_attn.q_norm.weight",)
    keys["layers.{l}.k_norm"] = (f"{LAYER}.self_attn.k_norm.weight",)
    keys["layers.{l}.router"] = tuple(f"{LAYER}.{p}.gate.weight" for p in moe_prefixes)
    for proj in ("gate", "up", "down"):
        keys[f"layers.{{l}}.shared.{proj}"] = (f"{LAYER}.mlp.shared_expert.{proj}_proj.weight",)
        keys[f"layers.{{l}}.dense.{proj}"] = (f"{LAYER}.mlp.{proj}_proj.weight",)
    keys["layers.{l}.shared_gate"] = (f"{LAYER}.mlp.shared_expert_gate.weight",)
    return keys


def fused_expert_keys(moe_prefix: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The [E, 2I, H] gate_up and [E, H, I] down keys of transformers' in-memory layout."""
    return (f"{LAYER}.{moe_prefix}.experts.gate_up_proj",), (f"{LAYER}.{moe_prefix}.experts.down_proj",)
