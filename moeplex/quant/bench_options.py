"""Options and settings of `moeplex bench quant` (argparse and a dataclass only, so the CLI parser stays light)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from moeplex.quant.formats import DEFAULT_GROUP_SIZE, GROUP_SIZES


@dataclass(frozen=True)
class QuantBenchSettings:
    new_tokens: int = 32
    prompt_tokens: int = 16
    repeats: int = 5
    threads: int = 2
    group_size: int = DEFAULT_GROUP_SIZE
    seed: int = 0


def add_bench_quant_options(parser: argparse.ArgumentParser) -> None:
    defaults = QuantBenchSettings()
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: bench demo base, built if missing)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help=f"tokens generated per run (default: {defaults.new_tokens})")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help=f"alternating timed runs per precision (default: {defaults.repeats})")
    parser.add_argument("--threads", type=int, default=defaults.threads, help=f"torch threads for every precision (default: {defaults.threads})")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=defaults.group_size, help=f"int4 group size (default: {defaults.group_size})")


def run_from_options(args: argparse.Namespace) -> dict:
    """Run the benchmark the options describe, print its table, write --json."""
    from moeplex.quant.bench import format_table, run_quant_benchmark

    model = args.model
    if model is None:
        from moeplex.demo import build_demo_family

        model = build_demo_family(size="bench").base
    settings = QuantBenchSettings(
        new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads, group_size=args.group_size
    )
    result = run_quant_benchmark(model, settings)
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return result
