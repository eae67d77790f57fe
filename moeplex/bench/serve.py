"""`moeplex bench serve`: multi-variant vs single-variant serving through the HTTP API, and backbone switch cost.

One engine serves 4 variants with a uniform request mix and, alternating with it, one variant with the
same requests. Throughput is completed output tokens per second in a closed loop at a fixed concurrency;
time to first token is measured in an open loop at a Poisson rate below saturation, its percentiles over the
requests of every run of a system. Each repeat runs the two systems back to back (in alternating order) and
the ratios are medians of the repeats' ratios, which the drift of a shared machine's speed barely moves. A
second engine whose backbone budget holds one backbone reports switch count, switch time and how much
background loading hid; last, the engines alone (no HTTP, no queueing) give the step-time ratio.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import torch

from moeplex.bench.measure import median, percentile
from moeplex.bench.serve_options import ServeBenchSettings
from moeplex.bench.serve_steps import engine_step_ratios
from moeplex.dtypes import resolve_dtype
from moeplex.engine import LLM, EngineConfig
from moeplex.server import BackgroundServer, create_app
from moeplex.store import StoreReader


@dataclass(frozen=True)
class BenchRequest:
    variant: str
    prompt: list[int]


def make_requests(variants: list[str], count: int, settings: ServeBenchSettings, vocab_size: int) -> list[BenchRequest]:
    """count requests cycling through variants (uniform mix), with the same prompts whatever the variants."""
    rng = random.Random(settings.seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(settings.prompt_tokens)] for _ in range(count)]
    return [BenchRequest(variants[i % len(variants)], prompt) for i, prompt in enumerate(prompts)]


def completion_body(request: BenchRequest, settings: ServeBenchSettings, stream: bool) -> dict:
    return {
        "model": request.variant, "prompt": request.prompt, "max_tokens": settings.output_tokens,
        "temperature": 0, "ignore_eos": True, "stream": stream,
    }


async def closed_loop(url: str, requests: list[BenchRequest], settings: ServeBenchSettings) -> dict:
    """Keep `concurrency` requests in flight until all are done; output tokens per second."""
    pending = list(requests)
    tokens = 0

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while pending:
            request = pending.pop()
            response = await http.post("/v1/completions", json=completion_body(request, settings, stream=False))
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=settings.concurrency)) as http:
        await asyncio.gather(*(worker(http) for _ in range(settings.concurrency)))
    seconds = time.perf_counter() - started
    return {"output_tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds, "requests_per_second": len(requests) / seconds}


async def open_loop(url: str, requests: list[BenchRequest], rate: float, settings: ServeBenchSettings) -> dict:
    """Streaming requests arriving as a Poisson process at `rate` per second; time to first token of each."""
    rng = random.Random(settings.seed + 1)
    ttfts: list[float] = []

    async def one(http: httpx.AsyncClient, request: BenchRequest) -> None:
        sent = time.perf_counter()
        async with http.stream("POST", "/v1/completions", json=completion_body(request, settings, stream=True)) as response:
            response.raise_for_status()
            first_token_at = None
            async for line in response.aiter_lines():
                if first_token_at is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    first_token_at = time.perf_counter()
        ttfts.append(first_token_at - sent)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(requests))) as http:
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(one(http, request)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return {"ttft_p50": statistics.median(ttfts), "ttft_p90": percentile(ttfts, 90), "rate": rate, "ttft_seconds": ttfts}


def engine_config(settings: ServeBenchSettings, backbone_budget_bytes: int | None = None) -> EngineConfig:
    return EngineConfig(
        dtype=resolve_dtype(settings.dtype),
        max_num_seqs=max(settings.max_num_seqs, settings.concurrency),
        max_num_batched_tokens=max(256, settings.concurrency * settings.prompt_tokens),
        max_model_len=settings.prompt_tokens + settings.output_tokens,
        backbone_budget_bytes=backbone_budget_bytes,
        max_pending_requests=max(256, settings.open_loop_requests),
        prefill=settings.prefill,
    )


def run_serve_benchmark(store: Path, settings: ServeBenchSettings) -> dict:
    torch.set_num_threads(settings.threads)
    llm = LLM(store, engine_config(settings))
    variants = llm.variants[: settings.num_variants]
    if len(variants) < settings.num_variants:
        raise ValueError(f"the store has {len(llm.variants)} variants; the benchmark needs {settings.num_variants}")
    vocab = llm.engine.spec.vocab_size
    closed = make_requests(variants, settings.closed_loop_requests, settings, vocab)
    opened = make_requests(variants, settings.open_loop_requests, settings, vocab)
    systems = {"multi": variants, "single": variants[:1]}

    def retarget(requests: list[BenchRequest], names: list[str]) -> list[BenchRequest]:
        return [BenchRequest(names[i % len(names)], r.prompt) for i, r in enumerate(requests)]

    throughput: dict[str, list[dict]] = {name: [] for name in systems}
    ttft: dict[str, list[dict]] = {name: [] for name in systems}
    with BackgroundServer(create_app(llm)) as url:
        for names in systems.values():  # warm-up
            asyncio.run(closed_loop(url, retarget(closed[: settings.concurrency], names), settings))
        for repeat in range(settings.repeats):
            for name in paired_order(list(systems), repeat):
                throughput[name].append(asyncio.run(closed_loop(url, retarget(closed, systems[name]), settings)))
        rate = settings.load_fraction * median([r["requests_per_second"] for r in throughput["single"]])
        for repeat in range(settings.repeats):
            for name in paired_order(list(systems), repeat):
                ttft[name].append(asyncio.run(open_loop(url, retarget(opened, systems[name]), rate, settings)))
    pooled = {name: [t for run in runs for t in run["ttft_seconds"]] for name, runs in ttft.items()}  # every run's requests
    summary = {
        name: {
            "tokens_per_second": median([r["tokens_per_second"] for r in throughput[name]]),
            "ttft_p50_seconds": statistics.median(pooled[name]),
            "ttft_p90_seconds": percentile(pooled[name], 90),
            "runs": {"closed_loop": throughput[name], "open_loop": ttft[name]},
        }
        for name in systems
    }
    one_backbone = run_one_backbone(store, settings, variants, closed)
    steps = engine_step_ratios(store, engine_config(settings), settings.num_variants, settings.prompt_tokens, settings.output_tokens, settings.engine_step_arrivals, settings.seed)
    return {
        "throughput_ratio_multi_vs_single": paired_ratio(throughput["multi"], throughput["single"], "tokens_per_second"),
        "ttft_p50_ratio_multi_vs_single": paired_ratio(ttft["multi"], ttft["single"], "ttft_p50"),
        "pair_ratios": {
            "throughput": pair_ratios(throughput["multi"], throughput["single"], "tokens_per_second"),
            "ttft_p50": pair_ratios(ttft["multi"], ttft["single"], "ttft_p50"),
        },
        "ttft_p50_ratio_pooled": summary["multi"]["ttft_p50_seconds"] / summary["single"]["ttft_p50_seconds"],
        "open_loop_rate_per_second": rate,
        "multi": summary["multi"],
        "single": summary["single"],
        "one_backbone": one_backbone,
        "engine_step_ratio_multi_vs_single": steps,
        "settings": asdict(settings),
        "compute_dtype": str(llm.engine.config.dtype).removeprefix("torch."),
        "store": str(store),
    }


def paired_order(systems: list[str], repeat: int) -> list[str]:
    """The systems in order on even repeats and reversed on odd ones (A B, B A, ...), so drift favours neither."""
    return systems if repeat % 2 == 0 else systems[::-1]


def pair_ratios(runs: list[dict], baseline_runs: list[dict], key: str) -> list[float]:
    """run[key] / baseline[key] of each repeat, the two run back to back."""
    return [run[key] / baseline[key] for run, baseline in zip(runs, baseline_runs, strict=True)]


def paired_ratio(runs: list[dict], baseline_runs: list[dict], key: str) -> float:
    """Median over repeats of run[key] / baseline[key], each pair run back to back.

    A shared machine's speed drifts by tens of percent over minutes; within a pair it moves less, so the
    median of pair ratios is steadier than the ratio of two medians (the spread is reported beside it).
    """
    return median(pair_ratios(runs, baseline_runs, key))


def run_one_backbone(store: Path, settings: ServeBenchSettings, variants: list[str], requests: list[BenchRequest]) -> dict:
    """The multi-variant closed loop on an engine whose backbone budget holds one backbone."""
    config = engine_config(settings)
    one = StoreReader(store).load_backbone(variants[0], config.dtype).nbytes
    llm = LLM(store, engine_config(settings, backbone_budget_bytes=one))
    with BackgroundServer(create_app(llm)) as url:
        result = asyncio.run(closed_loop(url, requests, settings))
    switches = llm.loop.stats().switches
    return {
        "tokens_per_second": result["tokens_per_second"],
        "switches": switches.switches,
        "switch_wait_seconds": switches.switch_seconds,
        "load_seconds": switches.load_seconds,
        "prefetch_hits": switches.prefetch_hits,
        "hidden_fraction": switches.hidden_fraction,
        "mean_switch_wait_ms": 1000 * switches.switch_seconds / max(1, switches.switches),
    }


def format_table(result: dict) -> str:
    multi, single, one, pairs = result["multi"], result["single"], result["one_backbone"], result["pair_ratios"]
    steps = result["engine_step_ratio_multi_vs_single"]
    return "\n".join(
        [
            f"{'system':<22}{'tokens/s':>10}{'TTFT p50 ms':>13}{'TTFT p90 ms':>13}",
            f"{'4 variants':<22}{multi['tokens_per_second']:>10.1f}{1000 * multi['ttft_p50_seconds']:>13.1f}{1000 * multi['ttft_p90_seconds']:>13.1f}",
            f"{'1 variant':<22}{single['tokens_per_second']:>10.1f}{1000 * single['ttft_p50_seconds']:>13.1f}{1000 * single['ttft_p90_seconds']:>13.1f}",
            f"multi/single, median of {result['settings']['repeats']} back-to-back pairs: throughput ratio "
            f"{result['throughput_ratio_multi_vs_single']:.3f}, TTFT p50 ratio {result['ttft_p50_ratio_multi_vs_single']:.3f} "
            f"(open loop at {result['open_loop_rate_per_second']:.2f} req/s)",
            f"spread of the pairs: throughput {min(pairs['throughput']):.2f}-{max(pairs['throughput']):.2f}, TTFT p50 "
            f"{min(pairs['ttft_p50']):.2f}-{max(pairs['ttft_p50']):.2f}; TTFT p50 ratio of all requests pooled "
            f"{result['ttft_p50_ratio_pooled']:.3f}",
            f"one resident backbone: {one['tokens_per_second']:.1f} tokens/s, {one['switches']} switches, "
            f"{one['mean_switch_wait_ms']:.1f} ms waited per switch, {100 * one['hidden_fraction']:.0f}% of loading hidden "
            f"({one['prefetch_hits']} prefetch hits)",
            f"engine alone, 4-variant step / 1-variant step (median of paired steps): {steps['with_prefill']:.3f} with a prefill, "
            f"{steps['decode_only']:.3f} decoding",
        ]
    )
