"""Training and evaluation of the tiny demo models with transformers' MixtralForCausalLM."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerBase

from moeplex.cores import available_cores

ROUTER_AUX_LOSS_COEF = 0.02


@dataclass(frozen=True)
class ModelDims:
    """Shape of a Mixtral-architecture model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    experts_per_token: int
    intermediate_size: int
    max_position_embeddings: int


@dataclass(frozen=True)
class TrainingSchedule:
    """One training run: AdamW with linear warmup then cosine decay to min_lr_ratio * lr."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF


def use_all_cores() -> int:
    """Sets torch's thread count to the cores this process may run on and returns it."""
    cores = available_cores()
    torch.set_num_threads(cores)
    return cores


def mixtral_config(
    dims: ModelDims, tokenizer: PreTrainedTokenizerBase, router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF
) -> MixtralConfig:
    """A MixtralConfig with the given shape and the tokenizer's vocabulary and special token ids."""
    return MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads,
        num_local_experts=dims.num_experts,
        num_experts_per_tok=dims.experts_per_token,
        max_position_embeddings=dims.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        router_aux_loss_coef=router_aux_loss_coef,
        tie_word_embeddings=False,
    )


def new_model(config: MixtralConfig, seed: int) -> MixtralForCausalLM:
    """A freshly initialized fp32 model; the seed fixes its weights."""
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def token_stream(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> torch.Tensor:
    """All documents as one 1-D token tensor, each document framed as <s> ... </s>."""
    encoded = tokenizer(list(documents), add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for document_ids in encoded:
        ids.append(tokenizer.bos_token_id)
        ids.extend(document_ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(
    streams: Sequence[torch.Tensor], batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """[batch_size, seq_len] random windows; row i comes from stream i % len(streams), so the mix is balanced."""
    rows = []
    for row in range(batch_size):
        stream = streams[row % len(streams)]
        start = int(torch.randint(0, len(stream) - seq_len, (1,), generator=generator))
        rows.append(stream[start : start + seq_len])
    return torch.stack(rows)


def warmup_cosine(schedule: TrainingSchedule) -> Callable[[int], float]:
    """The learning-rate multiplier per step: linear warmup, then cosine decay to min_lr_ratio."""

    def multiplier(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        progress = (step - schedule.warmup_steps) / max(1, schedule.steps - schedule.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return schedule.min_lr_ratio + (1.0 - schedule.min_lr_ratio) * cosine

    return multiplier


def train(
    model: MixtralForCausalLM,
    streams: Sequence[torch.Tensor],
    schedule: TrainingSchedule,
    seed: int,
    description: str,
) -> float:
    """Trains all weights of model in place on windows of streams; returns the mean LM loss of the last 10 steps."""
    for stream in streams:
        if len(stream) <= schedule.seq_len:
            raise ValueError(f"{description}: a training stream has {len(stream)} tokens, fewer than one window")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=schedule.lr,
        betas=(0.9, schedule.beta2),
        weight_decay=schedule.weight_decay,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(schedule))
    model.config.router_aux_loss_coef = schedule.router_aux_loss_coef
    model.router_aux_loss_coef = schedule.router_aux_loss_coef
    model.train()
    recent_losses: list[float] = []
    progress = tqdm(range(schedule.steps), desc=description, leave=False, dynamic_ncols=True)
    for _ in progress:
        batch = sample_batch(streams, schedule.batch_size, schedule.seq_len, generator)
        output = model(input_ids=batch, labels=batch, output_router_logits=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lm_loss = output.loss.item() - schedule.router_aux_loss_coef * output.aux_loss.item()
        recent_losses = (recent_losses + [lm_loss])[-10:]
        progress.set_postfix(loss=f"{lm_loss:.3f}", aux=f"{output.aux_loss.item():.3f}")
    model.eval()
    return sum(recent_losses) / len(recent_losses)


def fine_tune(
    base: MixtralForCausalLM, stream: torch.Tensor, schedule: TrainingSchedule, seed: int, description: str
) -> tuple[MixtralForCausalLM, float]:
    """A copy of base with all weights fine-tuned on one domain's stream, and its final training loss."""
    variant = copy.deepcopy(base)
    loss = train(variant, [stream], schedule, seed, description)
    return variant, loss


def spread_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """[W, seq_len] non-overlapping windows of stream, at most max_tokens in all, spread evenly over all of it."""
    available = len(stream) // seq_len
    if available == 0:
        raise ValueError(f"need at least {seq_len} tokens to measure perplexity, got {len(stream)}")
    windows = stream[: available * seq_len].view(available, seq_len)
    wanted = max(1, min(available, max_tokens // seq_len))
    return windows[torch.linspace(0, available - 1, wanted).round().long()]


@torch.inference_mode()
def perplexity(
    model: MixtralForCausalLM, stream: torch.Tensor, seq_len: int, max_tokens: int, batch_size: int = 16
) -> float:
    """exp(mean next-token loss) over non-overlapping seq_len windows spread over stream, max_tokens in all."""
    windows = spread_windows(stream, seq_len, max_tokens)
    model.eval()
    total_loss = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
    return math.exp(total_loss / (len(windows) * (seq_len - 1)))
