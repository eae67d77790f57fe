"""ModelSpec: the architecture facts the runtime needs, independent of any checkpoint's key names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and options of one MoE decoder, filled in by a family module from a HF config."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q, k, v
    output_bias: bool = False  # bias on o_proj
    qk_norm: str | None = None  # None, "head" (per head dim, Qwen3) or "full" (whole projection, OLMoE)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    normalize_top_k: bool = True  # renormalize the top-k routing weights to sum to 1
    sparse_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or a dense MLP (False)
    dense_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gated: bool = False  # sigmoid gate on the shared expert's output (Qwen2-MoE)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if not self.sparse_layers:
            object.__setattr__(self, "sparse_layers", (True,) * self.num_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def expert_numel(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size
