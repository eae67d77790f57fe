"""`moeplex bench offload`: decode tokens/s with experts offloaded to disk, per eviction/prefetch system and budget.

On the bench demo family's store (cold page cache: every expert read is O_DIRECT, or drops its pages again), at device
budgets that are fractions of the expert bytes, in one run, alternating after a warm-up request each:
on-demand + LRU, on-demand + LFU, moeplex (prediction + prefetch + trace-aware eviction), and fully
resident. Also hit rates, prefetch accuracy, bytes read per token, and prediction precision/recall by
layer distance, on the bench family and on the tiny trained demo family (whose routing is learned).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moeplex.bench.measure import median
from moeplex.bench.offload_ceiling import RoutingRecorder, measured_costs, prediction_ceiling
from moeplex.model.generate import generate
from moeplex.model.runtime import MoEModel
from moeplex.model.sampling import SamplingParams
from moeplex.model.spec import ModelSpec
from moeplex.model.weights import Backbone
from moeplex.offload.bench_options import OffloadBenchSettings
from moeplex.offload.calibration import calibrate
from moeplex.offload.config import OffloadConfig
from moeplex.offload.evaluation import PredictionScorer
from moeplex.offload.loading import build_offloaded_experts, load_offloaded_model
from moeplex.offload.offloaded import KeyTable, OffloadedExperts
from moeplex.offload.pool import PoolStats
from moeplex.offload.sources import StoreExpertSource
from moeplex.offload.tracing import TRACES_FOLDER, TraceLibrary
from moeplex.store.experts import StoreExperts
from moeplex.store.reader import StoreReader

SYSTEMS = {
    "lru": {"policy": "lru", "prediction": "none", "prefetch": False},
    "lfu": {"policy": "lfu", "prediction": "none", "prefetch": False},
    "moeplex": {"policy": "trace", "prediction": "combined", "prefetch": True},
}


class DecodeTimer:
    """Stands in for a model in `generate` and times its decode steps (one new token per sequence)."""

    def __init__(self, model: MoEModel):
        self.model, self.seconds, self.steps = model, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, token_ids, chunks, all_logits=False):
        started = time.perf_counter()
        logits = self.model.forward(token_ids, chunks, all_logits)
        if logits.is_cuda:
            torch.cuda.synchronize()
        if len(token_ids) == len(chunks):
            self.seconds += time.perf_counter() - started
            self.steps += len(chunks)
        return logits


def decode_tokens_per_s(model: MoEModel, prompt: list[int], new_tokens: int) -> float:
    timer = DecodeTimer(model)
    experts = model.experts
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    if isinstance(experts, OffloadedExperts):
        with experts.request("base"):
            generate(timer, [prompt], params)
    else:
        generate(timer, [prompt], params)
    return timer.steps / timer.seconds


def drop_page_cache(store: Path) -> None:
    """Evict the store's expert files from the page cache."""
    for path in (store / "experts").iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=generator).tolist()


@dataclass
class BenchSetup:
    """The store's one variant, opened once and shared by every system: backbone resident, experts on disk."""

    store: Path
    spec: ModelSpec
    table: KeyTable
    backbone: Backbone
    source: StoreExpertSource
    expert_bytes: int
    resident: MoEModel  # every expert on the device, in one bank
    device: str

    @staticmethod
    def open(store: Path, device: str = "cpu", direct_io: bool = True) -> BenchSetup:
        reader = StoreReader(store)
        spec, table, dtype = reader.spec("base"), reader.expert_table("base"), torch.bfloat16
        backbone = reader.load_backbone("base", dtype, device)
        source = StoreExpertSource(store, reader.manifest, spec, dtype, direct_io=direct_io)
        expert_ids = sorted(reader.manifest.referenced_expert_ids())
        bank = reader.load_expert_bank(expert_ids, spec, dtype, device)
        resident = MoEModel(spec, backbone, StoreExperts(bank, bank.rows(table, device)), dtype, device)
        return BenchSetup(store, spec, table, backbone, source, bank.nbytes, resident, device)

    def model(self, experts) -> MoEModel:
        return MoEModel(self.spec, self.backbone, experts, torch.bfloat16, self.device)

    def offloaded(self, system: str, budget: int, settings: OffloadBenchSettings) -> MoEModel:
        """One system's model at this budget, with its own copy of the calibrated trace library."""
        config = OffloadConfig(device_budget=budget, window=settings.window, min_probability=settings.min_probability, **SYSTEMS[system])
        library = TraceLibrary.load(self.store / TRACES_FOLDER) if config.prediction != "none" else None
        experts = build_offloaded_experts(self.spec, self.backbone, self.table, self.source, config, library, device=self.device)
        return self.model(experts)

    def seed_library(self, prompts: list[list[int]], settings: OffloadBenchSettings) -> None:
        """Calibration pass with every expert resident; the library is saved to <store>/traces."""
        config = OffloadConfig(device_budget=self.expert_bytes, prefetch=False, window=settings.window)
        experts = build_offloaded_experts(self.spec, self.backbone, self.table, self.source, config, device=self.device)
        calibrate(self.model(experts), prompts, settings.new_tokens, "base")
        experts.forecaster.tracer.library.save(self.store / TRACES_FOLDER)


def run_offload_benchmark(store: Path, settings: OffloadBenchSettings, progress=print) -> dict:
    torch.set_num_threads(settings.threads)
    progress(f"loading {store}")
    setup = BenchSetup.open(store, settings.device, settings.direct_io)
    count = settings.calibration_requests
    prompts = random_prompts(count + settings.repeats + 1, settings.prompt_tokens, setup.spec.vocab_size, settings.seed)
    progress(f"calibrating the trace library on {count} requests")
    drop_page_cache(store)
    setup.seed_library(prompts[:count], settings)
    result = {
        "store": str(store), "device": settings.device, "threads": settings.threads, "new_tokens": settings.new_tokens, "prompt_tokens": settings.prompt_tokens,
        "repeats": settings.repeats, "direct_io": settings.direct_io, "window": settings.window, "min_probability": settings.min_probability, "score_threshold": settings.score_threshold,
        "expert_bytes": setup.expert_bytes, "expert_count": len(setup.source.manifest.experts),
        "tokens_per_s": {}, "speedup_vs_lru": {}, "fraction_of_resident": {}, "pool": {}, "prefetcher": {}, "prediction": {}, "ceiling": {},
    }
    for fraction in settings.budgets:
        key = f"budget_{round(fraction * 100)}"
        measured = measure_budget(setup, int(fraction * setup.expert_bytes), prompts[count], prompts[count + 1 :], settings, progress)
        result["tokens_per_s"][key] = rates = measured["tokens_per_s"]
        result["speedup_vs_lru"][key] = rates["moeplex"] / rates["lru"]
        result["fraction_of_resident"][key] = rates["moeplex"] / rates["resident"]
        result["pool"][key], result["prefetcher"][key] = measured["pool"], measured["prefetcher"]
        result["ceiling"][key] = measured["ceiling"]
        result["prediction"][f"bench_{key}"] = measured["prediction"]
    result["next_layer_recall"] = result["prediction"][f"bench_budget_{round(settings.budgets[0] * 100)}"][1]["recall"]
    progress("prediction quality on the tiny trained demo family")
    result["prediction"]["tiny"] = tiny_family_prediction(settings)
    result["next_layer_recall_tiny"] = result["prediction"]["tiny"][1]["recall"]
    return result


def measure_budget(setup: BenchSetup, budget: int, warmup: list[int], prompts: list[list[int]], settings: OffloadBenchSettings, progress=print) -> dict:
    """Decode tokens/s of every system at this budget: a warm-up request each, then the prompts, alternating.

    Predictions are scored afterwards, untimed (scoring's host time would count against moeplex's speed),
    by a fresh moeplex model over the same prompts: its trace library is the calibrated one, without the
    traces that the timed requests of these prompts left in the timed model's library.
    """
    models = {name: setup.offloaded(name, budget, settings) for name in SYSTEMS}
    recorder = RoutingRecorder(setup.resident.experts, setup.table)
    models["resident"] = setup.model(recorder)
    drop_page_cache(setup.store)
    progress(f"budget {budget / 2**20:.0f} MiB of {setup.expert_bytes / 2**20:.0f} MiB: warm-up request per system")
    for model in models.values():
        decode_tokens_per_s(model, warmup, settings.new_tokens)
    for model in models.values():
        reset_counters(model)
    warmup_steps = len(recorder.steps)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for repeat, prompt in enumerate(prompts):
        progress(f"measured request {repeat + 1}/{len(prompts)}")
        for name, model in models.items():
            samples[name].append(decode_tokens_per_s(model, prompt, settings.new_tokens))
    tokens = len(prompts) * settings.new_tokens
    result = {
        "tokens_per_s": {name: median(values) for name, values in samples.items()},
        "pool": {name: pool_summary(models[name].experts.pool.stats, tokens) for name in SYSTEMS},
        "prefetcher": vars(models["moeplex"].experts.prefetcher.stats).copy(),
    }
    costs = measured_costs(recorder, result["tokens_per_s"]["resident"], models["lru"].experts.pool.stats)
    nbytes = {key: setup.source.expert_nbytes(key) for keys in setup.table if keys for key in keys}
    windows = (0, settings.window, setup.spec.num_layers)
    result["ceiling"] = prediction_ceiling(recorder, costs, budget, nbytes, warmup_steps, windows)
    for name in SYSTEMS:
        models[name].experts.close()
    scored = setup.offloaded("moeplex", budget, settings)
    result["prediction"] = score_predictions(scored, prompts, settings)
    scored.experts.close()
    return result


def score_predictions(model: MoEModel, prompts: list[list[int]], settings: OffloadBenchSettings) -> dict:
    """Precision/recall by distance of the model's forecaster over the prompts, run untimed with a scorer attached."""
    scorer = PredictionScorer(model.spec.num_layers, settings.score_threshold)
    model.experts.forecaster.scorer = scorer
    try:
        for prompt in prompts:
            decode_tokens_per_s(model, prompt, settings.new_tokens)
    finally:
        model.experts.forecaster.scorer = None
    return scorer.report()


def reset_counters(model: MoEModel) -> None:
    """Forget what warm-up counted (after the prefetcher has finished its work)."""
    experts = model.experts
    if not isinstance(experts, OffloadedExperts):
        return
    if experts.prefetcher is not None:
        experts.prefetcher.wait_until_idle()
        experts.prefetcher.stats = type(experts.prefetcher.stats)()
    experts.pool.stats = PoolStats()


def pool_summary(stats: PoolStats, tokens: int) -> dict:
    return stats.as_dict() | {"disk_bytes_per_token": stats.bytes_read["disk"] / tokens, "wait_seconds_per_token": stats.wait_seconds / tokens}


def tiny_family_prediction(settings: OffloadBenchSettings, requests_per_domain: int = 4) -> dict:
    """Precision/recall by distance on the tiny trained family: calibrate and evaluate on disjoint held-out text."""
    from transformers import AutoTokenizer

    from moeplex.demo import build_demo_family
    from moeplex.demo.corpora import DOMAINS
    from moeplex.eval.domains import heldout_token_ids

    demo = build_demo_family(size="tiny")
    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    length = settings.prompt_tokens
    calibration, evaluation = [], []
    for domain in DOMAINS:
        ids = heldout_token_ids(tokenizer, domain, 2 * requests_per_domain * length).tolist()
        chunks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
        calibration += chunks[0::2]
        evaluation += chunks[1::2]
    config = OffloadConfig(device_budget=2**40, prefetch=False, window=settings.window, min_probability=settings.min_probability)
    model = load_offloaded_model(demo.base, config, dtype=torch.float32)
    calibrate(model, calibration, settings.new_tokens, "base")
    return score_predictions(model, evaluation, settings)


def format_ceiling(ceiling: dict, measured_lru: float) -> str:
    costs = ceiling["costs"]
    def label(name: str) -> str:
        window = name.removeprefix("window_")
        return "Belady only" if window == "0" else f"{window} layers ahead"

    oracle = ", ".join(f"{label(name)} {entry['tokens_per_s']:.2f} ({entry['vs_lru']:.2f}x)" for name, entry in ceiling["oracle"].items())
    return (
        f"replayed routing (read {costs['read_bytes_per_second'] / 1e9:.2f} GB/s, layer {costs['layer_seconds'] * 1e3:.2f} ms + "
        f"{costs['expert_seconds'] * 1e3:.2f} ms per expert): LRU {ceiling['lru']:.2f} tok/s (measured {measured_lru:.2f}); oracle {oracle}"
    )


def format_table(result: dict) -> str:
    lines = [
        (
            f"store: {result['store']} ({result['expert_count']} experts, {result['expert_bytes'] / 2**20:.0f} MiB), "
            f"{result.get('device', 'cpu')}, threads: {result['threads']}, {result['new_tokens']} new tokens, median of {result['repeats']} requests, cold page cache "
            f"({'O_DIRECT' if result.get('direct_io', True) else 'page-cache'} reads)"
        ),
        f"{'budget':>10} {'system':>9} {'tok/s':>8} {'hit rate':>9} {'prefetch acc':>13} {'disk MB/tok':>12} {'wait s/tok':>11}",
    ]
    for key, rates in result["tokens_per_s"].items():
        for name, rate in rates.items():
            pool = result["pool"][key].get(name)
            cells = (
                f" {pool['hit_rate']:>9.1%} {pool['prefetch_accuracy']:>13.1%} {pool['disk_bytes_per_token'] / 1e6:>12.1f} {pool['wait_seconds_per_token']:>11.3f}"
                if pool else f" {'(all resident)':>9}"
            )
            lines.append(f"{key:>10} {name:>9} {rate:>8.2f}" + cells)
        lines.append(f"{key:>10} moeplex / lru: {result['speedup_vs_lru'][key]:.2f}x, moeplex / resident: {result['fraction_of_resident'][key]:.2f}x")
        if key in result.get("ceiling", {}):
            lines.append(f"{key:>10} {format_ceiling(result['ceiling'][key], rates['lru'])}")
    lines.append(f"prediction (an expert counts as predicted at p >= {result['score_threshold']}; moeplex prefetches at p >= {result['min_probability']}):")
    for name, by_distance in result["prediction"].items():
        cells = ", ".join(f"d={d}: P {r['precision']:.2f} R {r['recall']:.2f}" for d, r in by_distance.items())
        lines.append(f"  {name}: {cells}")
    lines.append(f"next-layer recall: {result['next_layer_recall']:.3f} (bench family), {result['next_layer_recall_tiny']:.3f} (tiny trained family)")
    return "\n".join(lines)
