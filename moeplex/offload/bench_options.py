"""Options and settings of `moeplex bench offload` (argparse and a dataclass only, so the CLI parser stays light)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moeplex.bench.options import add_json_option, add_threads_option, publish
from moeplex.offload.config import DEFAULT_MIN_PROBABILITY


@dataclass(frozen=True)
class OffloadBenchSettings:
    budgets: tuple[float, ...] = (0.25, 0.5)  # device budget as a fraction of the expert bytes
    new_tokens: int = 32
    prompt_tokens: int = 16
    repeats: int = 5  # measured requests per system and budget (after one warm-up request)
    calibration_requests: int = 8
    window: int = 2
    min_probability: float = DEFAULT_MIN_PROBABILITY  # prefetch threshold of the moeplex system
    score_threshold: float = 0.5  # an expert at least this likely counts as predicted when scoring precision/recall
    threads: int = 1
    seed: int = 0
    device: str = "cpu"  # where the experts are made resident and computed (cpu or cuda)
    direct_io: bool = True  # False: expert reads go through the page cache (its pages dropped after each read)


def add_options(parser: argparse.ArgumentParser) -> None:
    defaults = OffloadBenchSettings()
    parser.add_argument("--store", type=Path, help="store to offload from (default: identity store of the bench demo family, built if missing)")
    add_json_option(parser)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(defaults.budgets), help="device budgets as fractions of the expert bytes (default: 0.25 0.5)")
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help=f"tokens per request (default: {defaults.new_tokens})")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help=f"measured requests per system and budget (default: {defaults.repeats})")
    parser.add_argument("--window", type=int, default=defaults.window, help=f"sparse layers predicted ahead (default: {defaults.window})")
    parser.add_argument("--min-probability", type=float, default=defaults.min_probability, help=f"prefetch experts at least this likely (default: {defaults.min_probability})")
    parser.add_argument("--score-threshold", type=float, default=defaults.score_threshold, help=f"experts at least this likely count as predicted in precision/recall (default: {defaults.score_threshold})")
    add_threads_option(parser, defaults.threads)
    parser.add_argument("--page-cache-reads", action="store_true", help="read expert files through the page cache (dropping its pages after each read) instead of with O_DIRECT, to compare the two")
    parser.add_argument("--device", default=defaults.device, help="cpu, or cuda: experts computed on the GPU, read from disk on demand or by the prefetcher (default: cpu)")


def run_from_options(args: argparse.Namespace) -> dict:
    """Run the benchmark the options describe, print its table, write --json."""
    from moeplex.bench.offload import format_table, run_offload_benchmark
    from moeplex.demo.stores import bench_base_store

    settings = OffloadBenchSettings(
        budgets=tuple(args.budgets), new_tokens=args.new_tokens, repeats=args.repeats, window=args.window,
        min_probability=args.min_probability, score_threshold=args.score_threshold, threads=args.threads, device=args.device,
        direct_io=not args.page_cache_reads,
    )
    result = run_offload_benchmark(args.store or bench_base_store(), settings)
    return publish(format_table(result), result, args.json)
