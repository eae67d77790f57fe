"""Runs the multi-tenant comparison: per variant count, start every system, measure closed-loop capacity, sweep Poisson rates, collect."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from moeplex.bench.multitenant.client import Sample, run_trace
from moeplex.bench.multitenant.metrics import is_saturated, queue_time, summarize, turnaround_reduction
from moeplex.bench.multitenant.options import MultitenantSettings
from moeplex.bench.multitenant.report import write_report
from moeplex.bench.multitenant.stores import MIB, expert_bytes, single_variant_stores
from moeplex.bench.multitenant.systems import ServeOptions, System, build_systems
from moeplex.bench.multitenant.workload import Trace, closed_loop_trace, poisson_trace, variant_prompts
from moeplex.store import StoreReader


MOEPLEX_SYSTEMS = ("moeplex", "static", "single")  # the systems the headline ratios compare (the baselines may saturate at any rate)


class Stopwatch:
    def __init__(self):
        self.started = time.perf_counter()

    def say(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:6.0f} s] {message}", flush=True)


def measure(system: System, trace: Trace, drain: float | None = None) -> tuple[dict, list[Sample]]:
    """Replay the trace against the system: the run's summary (with queue time from the servers) and its samples."""
    system.wait_idle()
    before = system.queue_histogram()
    samples = run_trace(trace, system.route, drain=drain)
    system.wait_idle()
    summary = summarize(samples) | {"queue": queue_time(before, system.queue_histogram())}
    return summary, samples


def compare_at(variants: list[str], store: Path, singles: dict[str, Path], checkpoints: dict[str, Path], budget: int,
               settings: MultitenantSettings, out: Path, clock: Stopwatch) -> dict:
    """Every system serving these variants: unloaded and closed-loop runs, then the Poisson sweep; summaries and raw samples."""
    count = len(variants)
    prompts = variant_prompts(variants, settings.prompt_source)
    options = ServeOptions(dtype=settings.dtype, max_num_seqs=max(16, settings.concurrency), offload_policy=settings.offload_policy, prefetch=settings.prefetch)
    systems = build_systems(settings.systems, store, singles, {v: checkpoints[v] for v in variants}, budget, settings.threads, options, out / "logs")
    runs = {s.name: {"sweep": []} for s in systems}
    raw: dict[str, dict] = {s.name: {"sweep": []} for s in systems}
    try:
        clock.say(f"{count} variants: starting {', '.join(f'{s.name} (x{len(s.servers)})' for s in systems)}")
        for system in systems:
            system.start()
        for system in systems:
            system.wait_ready()
        warmup = closed_loop_trace(variants, 2 * count, count, prompts, settings.output_tokens, settings.seed)
        unloaded = closed_loop_trace(variants, 2 * count, 1, prompts, settings.output_tokens, settings.seed + 1)
        closed = closed_loop_trace(variants, settings.closed_loop_requests, settings.concurrency, prompts, settings.output_tokens, settings.seed + 2, settings.duration)
        unloaded.save(out / "traces" / "unloaded.json")
        closed.save(out / "traces" / "closed_loop.json")
        for system in systems:
            run_trace(warmup, system.route)
            for phase, trace in (("unloaded", unloaded), ("closed_loop", closed)):
                runs[system.name][phase], raw[system.name][phase] = measure(system, trace)
            clock.say(f"{count} variants: {system.name}: unloaded turnaround {runs[system.name]['unloaded']['turnaround']['mean']:.3f} s, "
                      f"closed loop {runs[system.name]['closed_loop']['tokens_per_second']:.1f} tokens/s")
        reference = "static" if "static" in runs else systems[0].name
        capacity = runs[reference]["closed_loop"]["requests_per_second"]
        saturated_at: dict[str, float] = {}
        for index, factor in enumerate(settings.load_factors):
            total = factor * capacity
            trace = poisson_trace({v: total / count for v in variants}, settings.duration, prompts, settings.output_tokens, settings.seed + 10 + index)
            trace.save(out / "traces" / f"poisson-{index}.json")
            for system in systems:
                if system.name in saturated_at and not (system.name == "moeplex" and "static" not in saturated_at and "static" in runs):
                    continue  # saturated at a lower rate (moeplex runs on until static partitioning saturates)
                summary, samples = measure(system, trace, settings.drain)
                runs[system.name]["sweep"].append({"rate": total, "load_factor": factor, "summary": summary})
                raw[system.name]["sweep"].append({"rate": total, "trace": f"traces/poisson-{index}.json", "samples": [asdict(s) for s in samples]})
                if is_saturated(summary, settings.duration):
                    saturated_at.setdefault(system.name, total)
                clock.say(f"{count} variants: {system.name} at {total:.2f} req/s ({len(trace.requests)} requests): mean turnaround "
                          f"{summary['turnaround']['mean']:.3f} s, TTFT p50 {summary['ttft']['p50']:.3f} s, {summary['errors']} errors"
                          f"{' (saturated)' if saturated_at.get(system.name) == total else ''}")
        for system in systems:
            runs[system.name]["peak_rss_bytes"] = system.peak_rss()
            runs[system.name]["saturation_rate"] = saturated_at.get(system.name)
            runs[system.name]["processes"] = len(system.servers)
            runs[system.name]["commands"] = [" ".join(["python -m", *server.args]) for server in system.servers]
    finally:
        for system in systems:
            system.stop()
    for name in raw:
        raw[name]["unloaded"] = [asdict(s) for s in raw[name]["unloaded"]]
        raw[name]["closed_loop"] = [asdict(s) for s in raw[name]["closed_loop"]]
    return {"variants": variants, "capacity_reference": reference, "capacity_requests_per_second": capacity, "systems": runs, "raw": raw}


def headline(comparison: dict) -> dict:
    """The three published claims for one variant count (None where a system needed was not run)."""
    systems = comparison["systems"]
    result: dict = {}
    if "moeplex" in systems and "static" in systems:
        static_rate = systems["static"]["saturation_rate"]
        result["static_saturated_in_sweep"] = static_rate is not None
        at = static_rate if static_rate is not None else systems["static"]["sweep"][-1]["rate"]
        mean_at = {name: next(p["summary"]["turnaround"]["mean"] for p in systems[name]["sweep"] if p["rate"] == at) for name in ("moeplex", "static")}
        result |= {"static_saturation_rate": at, "moeplex_turnaround_mean": mean_at["moeplex"], "static_turnaround_mean": mean_at["static"],
                   "turnaround_reduction_vs_static": turnaround_reduction(mean_at["moeplex"], mean_at["static"])}
    if "moeplex" in systems and "single" in systems:
        moeplex, single = systems["moeplex"], systems["single"]
        low = moeplex["sweep"][0]["rate"]
        saturations = [s["saturation_rate"] for name, s in systems.items() if name in MOEPLEX_SYSTEMS and s["saturation_rate"] is not None]
        result |= {
            "throughput_ratio_vs_single": moeplex["closed_loop"]["tokens_per_second"] / single["closed_loop"]["tokens_per_second"],
            "ttft_rate": low,
            "ttft_rate_below_every_saturation": all(low < rate for rate in saturations),  # of moeplex, static and single
            "ttft_p50_ratio_vs_single": moeplex["sweep"][0]["summary"]["ttft"]["p50"] / single["sweep"][0]["summary"]["ttft"]["p50"],
        }
    return result


def run_multitenant_benchmark(store: Path | None, out: Path, settings: MultitenantSettings) -> dict:
    """The whole comparison at each variant count; writes traces, raw samples, the table and plots under `out`."""
    from moeplex.demo.stores import demo_store

    clock = Stopwatch()
    store = store or demo_store()
    reader = StoreReader(store)
    needed = reader.variants[: max(settings.variant_counts)]
    if len(needed) < max(settings.variant_counts):
        raise ValueError(f"the store has {len(reader.variants)} variants; the benchmark needs {max(settings.variant_counts)}")
    checkpoints = {v: Path(reader.manifest.sources[v].path) for v in needed}
    singles = single_variant_stores(checkpoints, store.parent / f"{store.name}-single-variant-stores")
    budget = int(settings.budget_mib * MIB) if settings.budget_mib else expert_bytes(store, settings.dtype)
    one = {v: expert_bytes(singles[v], settings.dtype) for v in needed}
    clock.say(f"store {store}: total expert budget {budget / MIB:.2f} MiB (the store's experts in {settings.dtype}); one variant's experts "
              f"{max(one.values()) / MIB:.2f} MiB; static partitions get " + ", ".join(f"{budget / n / MIB:.2f} MiB each at {n} variants" for n in settings.variant_counts))
    comparisons = {}
    for count in settings.variant_counts:
        comparisons[str(count)] = compare_at(needed[:count], store, singles, checkpoints, budget, settings, out / f"variants-{count}", clock)
    result = {
        "by_variants": {count: headline(c) for count, c in comparisons.items()},
        "budget": {"total_expert_bytes": budget, "one_variant_expert_bytes": one, "static_partition_bytes": {str(n): budget // n for n in settings.variant_counts}},
        "comparisons": {count: {k: v for k, v in c.items() if k != "raw"} for count, c in comparisons.items()},
        "settings": asdict(settings),
        "store": str(store),
        "out": str(out),
        "elapsed_seconds": time.perf_counter() - clock.started,
    }
    write_report(out, result, {count: c["raw"] for count, c in comparisons.items()})
    return result
