"""Seeded workloads saved as trace files: per-variant Poisson arrivals, or a closed loop; every system replays the same requests."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds after the trace starts (ignored in a closed loop)
    variant: str
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order; concurrency > 0 marks a closed loop (that many clients, arrivals ignored)."""

    requests: tuple[TraceRequest, ...]
    rates: dict[str, float] = field(default_factory=dict)  # requests per second of each variant (open loop)
    duration: float = 0.0
    concurrency: int = 0
    seed: int = 0

    @property
    def total_rate(self) -> float:
        return sum(self.rates.values())

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self) | {"requests": [asdict(r) for r in self.requests]}
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @staticmethod
    def load(path: Path) -> Trace:
        data = json.loads(Path(path).read_text())
        return Trace(**(data | {"requests": tuple(TraceRequest(**r) for r in data["requests"])}))


def poisson_trace(rates: dict[str, float], duration: float, prompts: dict[str, list[str]], max_tokens: int, seed: int) -> Trace:
    """Independent Poisson arrivals of each variant at its rate for `duration` seconds, merged in time order."""
    rng = random.Random(seed)
    requests = []
    for variant, rate in rates.items():
        arrival = rng.expovariate(rate) if rate > 0 else duration
        while arrival < duration:
            requests.append(TraceRequest(arrival, variant, rng.choice(prompts[variant]), max_tokens))
            arrival += rng.expovariate(rate)
    requests.sort(key=lambda r: (r.arrival, r.variant))
    return Trace(tuple(requests), dict(rates), duration, 0, seed)


def closed_loop_trace(variants: list[str], count: int, concurrency: int, prompts: dict[str, list[str]], max_tokens: int, seed: int, duration: float = 0.0) -> Trace:
    """Up to `count` requests cycling through the variants (uniform mix), sent by `concurrency` clients back to back; no new one after `duration` s (0: no limit)."""
    rng = random.Random(seed)
    requests = tuple(TraceRequest(0.0, variants[i % len(variants)], rng.choice(prompts[variants[i % len(variants)]]), max_tokens) for i in range(count))
    return Trace(requests, duration=duration, concurrency=concurrency, seed=seed)


def variant_prompts(variants: list[str], source: str, count: int = 8, chars: int = 48) -> dict[str, list[str]]:
    """Short prompts per variant: its domain's fixed demo prompt, or the openings of its domain's held-out documents."""
    from moeplex.demo import DOMAINS
    from moeplex.main_job import DOMAIN_PROMPTS

    prompts = {}
    for variant in variants:
        if source == "corpus" and variant in DOMAINS:
            from moeplex.demo.corpora import load_documents

            prompts[variant] = [document[:chars] for document in load_documents(variant, "heldout")[:count]]
        else:
            prompts[variant] = [DOMAIN_PROMPTS.get(variant, "The ")]
    return prompts
