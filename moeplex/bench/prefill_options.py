"""Command-line options of `moeplex bench prefill` (argparse only, so the CLI parser stays light)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeplex.bench.options import add_json_option, add_threads_option, publish


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: the tiny demo base, built if missing)")
    add_json_option(parser)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[32, 256], help="prompt lengths (default: 32 256)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed runs per setting (default: 5)")
    add_threads_option(parser, default=2, applies_to="both settings")
    parser.add_argument(
        "--as-if-emulated",
        action="store_true",
        help="upcast as on a CPU that emulates bf16 even if this one has bf16 instructions; with "
        "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 set, a newer x86 CPU then runs like an AVX2-only one",
    )


def run_from_options(args: argparse.Namespace) -> dict:
    """Run the benchmark the options describe, print its table, write --json."""
    from moeplex.bench.prefill import PrefillSettings, format_table, run_prefill_benchmark

    model = args.model
    if model is None:
        from moeplex.demo import build_demo_family

        model = build_demo_family(size="tiny").base
    settings = PrefillSettings(prompt_tokens=tuple(args.prompt_tokens), repeats=args.repeats, threads=args.threads, as_if_emulated=args.as_if_emulated)
    result = run_prefill_benchmark(model, settings)
    return publish(format_table(result), result, args.json)
