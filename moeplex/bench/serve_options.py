"""Options and settings of `moeplex bench serve` (argparse and a dataclass only, so the CLI parser stays light)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from moeplex.bench.options import add_json_option, add_threads_option, publish
from moeplex.cores import serving_threads
from moeplex.dtypes import DTYPE_CHOICES, DTYPE_HELP
from moeplex.scheduling_choices import PREFILL_MODES


@dataclass(frozen=True)
class ServeBenchSettings:
    num_variants: int = 4
    concurrency: int = 8
    max_num_seqs: int = 32  # the engine's running-sequence limit, above the closed loop's concurrency so open-loop bursts are not queued for a slot
    closed_loop_requests: int = 48
    open_loop_requests: int = 48
    load_fraction: float = 0.5  # Poisson rate as a fraction of the single-variant saturated request rate
    prompt_tokens: int = 32
    output_tokens: int = 32
    engine_step_arrivals: int = 120  # requests fed to the engines-alone step comparison, one every 8 steps
    repeats: int = 11  # pairs: one pair moves by 0.1-0.5 on a shared 2-core VM; the median of 11 by much less
    threads: int = field(default_factory=serving_threads)  # what `moeplex serve` uses: a core is left to the HTTP server
    dtype: str = "bf16"
    prefill: str = "separate"  # EngineConfig.prefill: new prompts get steps of their own, or join decode steps
    seed: int = 0


def add_options(parser: argparse.ArgumentParser) -> None:
    defaults = ServeBenchSettings()
    parser.add_argument("--store", type=Path, help="store to serve (default: the tiny demo family's consolidated store that `make run` serves, built if missing)")
    add_json_option(parser)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help=f"closed-loop clients (default: {defaults.concurrency})")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, help=f"the engine's limit on running sequences (default: {defaults.max_num_seqs})")
    parser.add_argument("--requests", type=int, default=defaults.closed_loop_requests, help=f"requests per closed-loop run (default: {defaults.closed_loop_requests})")
    parser.add_argument("--output-tokens", type=int, default=defaults.output_tokens, help=f"tokens per completion (default: {defaults.output_tokens})")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help=f"alternating runs per system (default: {defaults.repeats})")
    add_threads_option(parser, defaults.threads, "the engine, as many as `moeplex serve` gives it: one per core less one, left to the HTTP server")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=defaults.dtype, help=DTYPE_HELP)
    parser.add_argument("--prefill", choices=PREFILL_MODES, default=defaults.prefill,
                        help=f"both systems schedule prefills as `moeplex serve --prefill` does (default: {defaults.prefill})")


def run_from_options(args: argparse.Namespace) -> dict:
    """Run the benchmark the options describe, print its table, write --json."""
    from moeplex.bench.serve import format_table, run_serve_benchmark
    from moeplex.demo.stores import demo_store

    settings = ServeBenchSettings(
        concurrency=args.concurrency, max_num_seqs=args.max_num_seqs, closed_loop_requests=args.requests, output_tokens=args.output_tokens,
        repeats=args.repeats, threads=args.threads, dtype=args.dtype, prefill=args.prefill,
    )
    result = run_serve_benchmark(args.store or demo_store(), settings)
    return publish(format_table(result), result, args.json)
