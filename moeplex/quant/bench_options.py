"""Options and settings of `moeplex bench quant` (argparse and a dataclass only, so the CLI parser stays light)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moeplex.bench.options import add_json_option, add_threads_option
from moeplex.planner.options import add_selection_error_option
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, GROUP_SIZES
from moeplex.results import write_json


@dataclass(frozen=True)
class QuantBenchSettings:
    new_tokens: int = 32
    prompt_tokens: int = 16
    repeats: int = 5
    threads: int = 2
    group_size: int = DEFAULT_GROUP_SIZE
    seed: int = 0


PARTS = ("speed", "kernels", "selection", "frontier")
STORE_FAMILIES = ("tiny", "bench")
FRONTIER_STEPS = 8  # int4 / int8 counts at eighths of the experts: 45 configurations
# Held-out tokens per domain on the tiny family's store: all of the prose and licenses domains' (7-9k each), a third
# of Python's, a quarter of C++'s; at 1024 the policies' perplexities differed by less than that text's own noise
# (docs/benchmarks.md). Other stores keep the planner's 1024: the bench family is untrained (scored by KL), and
# 32768 there costs 160 s per configuration on 2 cores.
TINY_HELDOUT_TOKENS_PER_DOMAIN = 32768
FRONTIER_DEVICE_MEMORY = "0.35x"  # of the store all resident in bf16: every backbone, ~1/6 of the bf16 experts


def add_options(parser: argparse.ArgumentParser) -> None:
    defaults = QuantBenchSettings()
    parser.add_argument("--model", type=Path, help="checkpoint folder (default: bench demo base, built if missing)")
    add_json_option(parser)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens, help=f"tokens generated per run (default: {defaults.new_tokens})")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help=f"alternating timed runs per precision (default: {defaults.repeats})")
    add_threads_option(parser, defaults.threads, applies_to="every precision")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=defaults.group_size, help=f"int4 group size (default: {defaults.group_size})")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="speed: all int4 / int8 vs bf16 on the bench model; kernels: one expert matmul in bf16 and both int4 kernels "
                             "at 1-16 tokens; selection and frontier: on --store (default: all)")
    parser.add_argument("--store", type=Path, help="store for selection and frontier (default: --family's demo store)")
    parser.add_argument("--family", choices=STORE_FAMILIES, default="tiny",
                        help="demo store for selection and frontier without --store: tiny, the trained tiny family's identity store "
                             "(its decode is bound by per-step overhead); bench, the bench family's base alone (untrained, so score "
                             "it by KL; its decode is bound by expert bytes, as real models' is) (default: tiny)")
    parser.add_argument("--frontier-steps", type=int, default=FRONTIER_STEPS, help=f"int4 / int8 counts at multiples of 1/STEPS of the experts (default: {FRONTIER_STEPS})")
    parser.add_argument("--plot", type=Path, help="write the frontier part's configurations and its frontier over KL from all bf16 as a PNG here")
    add_selection_error_option(parser)
    parser.add_argument("--heldout-tokens", type=int,
                        help="held-out tokens per demo domain that selection and frontier score perplexity and KL on (a domain "
                             f"with less gives all it has; default: {TINY_HELDOUT_TOKENS_PER_DOMAIN} on the tiny family's "
                             "store, else the planner's 1024)")
    parser.add_argument("--device-memory", default=FRONTIER_DEVICE_MEMORY,
                        help="the fixed device budget of the frontier (backbones + resident experts; experts beyond it are "
                             f"offloaded): 30MB, or 0.35x of the store all resident in bf16 (default: {FRONTIER_DEVICE_MEMORY})")


def run_from_options(args: argparse.Namespace) -> dict:
    """Run the parts the options name, print their tables, write --json."""
    result = {}
    if "speed" in args.parts:
        result.update(_run_speed(args))
    if "kernels" in args.parts:
        result.update(_run_kernels(args))
    if {"selection", "frontier"} & set(args.parts):
        result.update(_run_store_parts(args))
    write_json(args.json, result)
    return result


def _run_speed(args: argparse.Namespace) -> dict:
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
    return result


def _run_kernels(args: argparse.Namespace) -> dict:
    from moeplex.quant.bench_kernels import format_kernel_table, run_kernel_benchmark

    result = run_kernel_benchmark(args.threads, args.group_size, args.repeats)
    print(format_kernel_table(result))
    return result


def store_parts_store(args: argparse.Namespace) -> Path:
    """The store the selection and frontier parts run on: --store, else --family's demo store (built on first use)."""
    from moeplex.demo.stores import bench_base_store, identity_store

    if args.store is not None:
        return args.store
    return bench_base_store() if args.family == "bench" else identity_store()


def heldout_tokens_per_domain(args: argparse.Namespace) -> int | None:
    """--heldout-tokens, else the tiny family's default on its demo store, else None (the planner's default)."""
    if args.heldout_tokens is not None:
        return args.heldout_tokens
    return TINY_HELDOUT_TOKENS_PER_DOMAIN if args.store is None and args.family == "tiny" else None


def _run_store_parts(args: argparse.Namespace) -> dict:
    from moeplex.planner.command import device_budgets
    from moeplex.planner.meter import MeterSettings, StoreMeter
    from moeplex.planner.profile import Profiler
    from moeplex.quant.bench_store import (
        compare_selections,
        format_frontier,
        format_selection,
        measure_frontier,
        plot_frontier_result,
    )

    store = store_parts_store(args)
    heldout = heldout_tokens_per_domain(args)
    text_size = {} if heldout is None else {"heldout_tokens_per_domain": heldout}  # None: MeterSettings' default
    meter = StoreMeter(store, MeterSettings(threads=args.threads, group_size=args.group_size, selection_error=args.selection_error,
                                            **text_size))
    device_bytes, expert_budget = device_budgets(meter, args.device_memory)
    profiler = Profiler(meter, expert_budget=expert_budget)  # the selection part scores quality only: budget unused there
    result = {"store": str(store), "device_memory_bytes": device_bytes, "expert_budget_bytes": expert_budget}
    if "selection" in args.parts:
        result["selection"] = compare_selections(profiler, profiler.heldout)
        print(format_selection(result["selection"]))
    if "frontier" in args.parts:
        result.update(measure_frontier(profiler, args.frontier_steps))
        print(format_frontier(result))
        if args.plot is not None:
            print(f"wrote {plot_frontier_result(result, args.plot, f'moeplex bench quant, {store.name}')}")
    return result
