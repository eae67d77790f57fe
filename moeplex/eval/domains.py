"""Perplexity of several models on each demo domain's held-out text, through our runtime."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from moeplex.demo.corpora import DOMAINS, domain_text
from moeplex.eval.perplexity import DEFAULT_WINDOW, runtime_logits, windowed_perplexity
from moeplex.model.runtime import load_model

DEFAULT_MAX_TOKENS = 4096


@dataclass
class PerplexityReport:
    models: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> domain -> ppl
    own_domain: dict[str, str] = field(default_factory=dict)  # variant -> domain

    def to_json(self) -> dict:
        return {"models": self.models, "own_domain": self.own_domain}

    def table(self) -> str:
        domains = sorted({d for row in self.models.values() for d in row})
        lines = ["model".ljust(14) + "".join(d.rjust(11) for d in domains)]
        for name, row in self.models.items():
            own = self.own_domain.get(name)
            cells = "".join((f"{row[d]:.2f}" + ("*" if d == own else " ")).rjust(11) for d in domains)
            lines.append(name.ljust(14) + cells)
        lines.append("(* = the variant's own domain)")
        return "\n".join(lines)


def heldout_token_ids(tokenizer, domain: str, max_tokens: int) -> torch.Tensor:
    """The first max_tokens tokens of a domain's held-out text (no model was trained on it)."""
    text = domain_text(domain, "heldout", max_chars=max_tokens * 8)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def evaluate_models(
    models: dict[str, Path],
    domains: tuple[str, ...] = DOMAINS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    window: int = DEFAULT_WINDOW,
    dtype: torch.dtype = torch.bfloat16,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """model name -> domain -> perplexity, each model loaded once and evaluated on every domain."""
    results: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(models) * len(domains), desc="perplexity", unit="eval", disable=not progress)
    for name, folder in models.items():
        model = load_model(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        scorer = runtime_logits(model)
        results[name] = {}
        for domain in domains:
            bar.set_postfix_str(f"{name}/{domain}")
            ids = heldout_token_ids(tokenizer, domain, max_tokens)
            results[name][domain] = windowed_perplexity(scorer, ids, window)
            bar.update()
    bar.close()
    return results
