"""Command-line options of `moeplex bench decode` (argparse only, so the CLI parser stays light)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeplex.bench.options import add_json_option, add_threads_option, publish
from moeplex.dtypes import DTYPE_CHOICES


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: bench demo base, built if missing)")
    add_json_option(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure (default: 1 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed runs per system (default: 3)")
    add_threads_option(parser, default=2, applies_to="both systems")
    parser.add_argument("--device", default="cpu", help="where both systems run: cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="compute dtype of both systems: bf16 (default) or fp32")
    parser.add_argument("--profile", action="store_true", help="also profile moeplex's decode at the first batch size and print the top operators")


def run_from_options(args: argparse.Namespace) -> dict:
    """Run the benchmark the options describe, print its table, write --json."""
    from moeplex.bench.decode import DecodeSettings, format_table, run_decode_benchmark

    model = args.model
    if model is None:
        from moeplex.demo import build_demo_family

        model = build_demo_family(size="bench").base
    settings = DecodeSettings(
        batch_sizes=tuple(args.batch_sizes), new_tokens=args.new_tokens, repeats=args.repeats, threads=args.threads,
        profile=args.profile, device=args.device, dtype=args.dtype,
    )
    result = run_decode_benchmark(model, settings)
    return publish(format_table(result), result, args.json)
