"""What every `moeplex bench` subcommand shares: the registry of benchmarks, common options, printing and saving.

argparse and the standard library only, so building the CLI parser stays light: each benchmark's options
module is imported when the parser is built, its run module only when the benchmark runs.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path

from moeplex.results import write_json


@dataclass(frozen=True)
class Benchmark:
    name: str
    options_module: str  # defines add_options(parser) and run_from_options(args) -> dict
    help: str
    description: str


BENCHMARKS = (
    Benchmark(
        "decode",
        "moeplex.bench.decode_options",
        "decode tokens/s of moeplex vs transformers' generate, and the bandwidth roofline",
        "On a bench-size model (>=300M parameters, bf16; the 'bench' demo family's base unless --model is given), "
        "measure decode tokens/s at each batch size for the moeplex runtime and for transformers' generate in one "
        "run, alternating, with the same thread count; report the weight bytes streamed per token and the fraction "
        "of the streaming bandwidth measured in the same run.",
    ),
    Benchmark(
        "prefill",
        "moeplex.bench.prefill_options",
        "prompt processing time in bf16, with and without fp32 matmuls on CPUs that emulate bf16",
        "On one model (the tiny demo base unless --model is given), loaded once in bf16, prefill the same random "
        "prompt at each length with bf16 matmuls of many rows done in fp32 (what moeplex does on x86 CPUs without "
        "bf16 instructions) and kept in bf16, in one run, alternating; report medians and their ratio.",
    ),
    Benchmark(
        "serve",
        "moeplex.bench.serve_options",
        "throughput and time to first token: 4 variants vs 1 through the HTTP API",
        "Serve 4 variants with a uniform request mix and 1 variant with the same requests, in one run, alternating: "
        "closed-loop throughput and open-loop Poisson time to first token; plus a run with one resident backbone "
        "reporting switch cost.",
    ),
    Benchmark(
        "quant",
        "moeplex.quant.bench_options",
        "decode tokens/s with every expert int4 / int8 vs bf16, everything resident",
        "On a bench-size model, decode at batch 1 with every expert bf16, int8 and int4 (weight-only), in one run, "
        "alternating, with the same thread count; report the speedups, expert bytes per token and the fraction of "
        "the streaming bandwidth measured in the same run.",
    ),
    Benchmark(
        "offload",
        "moeplex.offload.bench_options",
        "decode tokens/s with experts offloaded to disk: LRU, LFU, moeplex (predict + prefetch), resident",
        "On the bench demo family's store, cold page cache, at device budgets of 25%% and 50%% of the expert bytes, "
        "in one run, alternating: on-demand + LRU, on-demand + LFU, moeplex (prediction + prefetch + trace-aware "
        "eviction) and fully resident; hit rates, prefetch accuracy, bytes per token, prediction recall.",
    ),
    Benchmark(
        "multitenant",
        "moeplex.bench.multitenant.options",
        "moeplex vs static partitioning (MIG-style), one model, whole-model swapping, transformers: Poisson workloads over HTTP",
        "For 2 and 4 variants at one total expert budget (the consolidated store's expert bytes, so each static partition "
        "must offload), start every system as server processes behind the OpenAI API, measure closed-loop capacity, then "
        "replay the same seeded Poisson traces at rising rates: turnaround, TTFT, time per output token, queue time, "
        "throughput, errors and peak memory; writes raw samples, a Markdown table and plots to --out.",
    ),
)


def add_bench_commands(bench_commands) -> None:
    """One subparser per benchmark of BENCHMARKS; its handler runs the benchmark and returns exit status 0."""
    for benchmark in BENCHMARKS:
        module = importlib.import_module(benchmark.options_module)
        parser = bench_commands.add_parser(benchmark.name, help=benchmark.help, description=benchmark.description)
        module.add_options(parser)
        parser.set_defaults(handler=_handler(module))


def _handler(module):
    def run(args: argparse.Namespace) -> int:
        module.run_from_options(args)
        return 0

    return run


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="write the results as JSON here")


def add_threads_option(parser: argparse.ArgumentParser, default: int, applies_to: str = "every system") -> None:
    parser.add_argument("--threads", type=int, default=default, help=f"torch threads for {applies_to} (default: {default})")


def publish(table: str, result: dict, path: Path | None) -> dict:
    """Print a benchmark's table and write its result to --json; returns the result."""
    print(table)
    write_json(path, result)
    return result
