"""Options and settings of `moeplex bench multitenant` (argparse and a dataclass only, so the CLI parser stays light)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moeplex.bench.options import add_json_option, add_threads_option, publish
from moeplex.dtypes import DTYPE_CHOICES, DTYPE_HELP

SYSTEM_NAMES = ("moeplex", "static", "single", "swapping", "transformers")


@dataclass(frozen=True)
class MultitenantSettings:
    variant_counts: tuple[int, ...] = (2, 4)
    systems: tuple[str, ...] = SYSTEM_NAMES
    duration: float = 12.0  # seconds of Poisson arrivals per rate (and the closed loop's sending time)
    load_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0)  # total arrival rates as multiples of static partitioning's closed-loop capacity
    drain: float = 10.0  # seconds after the last arrival before unfinished requests count as errors
    output_tokens: int = 25
    prompt_source: str = "fixed"  # fixed: one short prompt per variant's domain; corpus: openings of held-out documents
    concurrency: int = 8  # closed-loop clients
    closed_loop_requests: int = 64  # at most; no new request after `duration` seconds
    threads: int = 2  # torch threads of the whole machine share: static partitions get threads // N each
    dtype: str = "bf16"
    budget_mib: float | None = None  # total device MiB for experts (default: the consolidated store's expert bytes)
    offload_policy: str = "trace"
    prefetch: bool = True
    seed: int = 0


def add_options(parser: argparse.ArgumentParser) -> None:
    defaults = MultitenantSettings()
    parser.add_argument("--store", type=Path, help="consolidated store to serve (default: the tiny demo family's 2x store, built if missing)")
    parser.add_argument("--out", type=Path, default=Path("moeplex-multitenant"), help="report folder: traces, raw samples, table, plots, server logs (default: ./moeplex-multitenant)")
    add_json_option(parser)
    parser.add_argument("--variants", type=int, nargs="+", default=list(defaults.variant_counts), help="variant counts to compare at (default: 2 4)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEM_NAMES, default=list(defaults.systems), help="systems to run (default: all)")
    parser.add_argument("--duration", type=float, default=defaults.duration, help=f"seconds of arrivals per rate (default: {defaults.duration:g})")
    parser.add_argument("--load-factors", type=float, nargs="+", default=list(defaults.load_factors), help="total rates as multiples of static partitioning's closed-loop capacity (default: 0.25 0.5 1 1.5 2)")
    parser.add_argument("--drain", type=float, default=defaults.drain, help=f"seconds after the last arrival before unfinished requests are errors (default: {defaults.drain:g})")
    parser.add_argument("--output-tokens", type=int, default=defaults.output_tokens, help=f"tokens generated per request (default: {defaults.output_tokens})")
    parser.add_argument("--prompts", choices=("fixed", "corpus"), default=defaults.prompt_source, help="fixed: one short prompt per variant; corpus: openings of held-out documents (default: fixed)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help=f"closed-loop clients (default: {defaults.concurrency})")
    parser.add_argument("--requests", type=int, default=defaults.closed_loop_requests, help=f"most requests per closed-loop run; none is sent after --duration seconds (default: {defaults.closed_loop_requests})")
    add_threads_option(parser, defaults.threads, "the machine, split evenly among static partitions")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=defaults.dtype, help=DTYPE_HELP)
    parser.add_argument("--budget-mib", type=float, help="total device MiB for experts (default: the store's expert bytes; each static partition gets 1/N)")
    parser.add_argument("--offload-policy", choices=("lru", "lfu", "trace"), default=defaults.offload_policy, help=f"expert eviction policy of moeplex processes (default: {defaults.offload_policy})")
    parser.add_argument("--no-prefetch", action="store_true", help="moeplex processes fetch experts on demand only")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"workload seed (default: {defaults.seed})")


def run_from_options(args: argparse.Namespace) -> dict:
    """Run the comparison the options describe, write the report to --out, print its table, write --json."""
    from moeplex.bench.multitenant.processes import stop_servers_on_sigterm
    from moeplex.bench.multitenant.report import format_summary
    from moeplex.bench.multitenant.runner import run_multitenant_benchmark

    settings = MultitenantSettings(
        variant_counts=tuple(args.variants), systems=tuple(args.systems), duration=args.duration, load_factors=tuple(sorted(args.load_factors)),
        drain=args.drain, output_tokens=args.output_tokens, prompt_source=args.prompts, concurrency=args.concurrency,
        closed_loop_requests=args.requests, threads=args.threads, dtype=args.dtype, budget_mib=args.budget_mib,
        offload_policy=args.offload_policy, prefetch=not args.no_prefetch, seed=args.seed,
    )
    stop_servers_on_sigterm()
    result = run_multitenant_benchmark(args.store, args.out, settings)
    return publish(format_summary(result), result, args.json)
