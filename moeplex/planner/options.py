"""Options of `moeplex plan` (argparse only, so that building the CLI parser imports no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeplex.quant.formats import DEFAULT_GROUP_SIZE, GROUP_SIZES
from moeplex.quant.policies import DEFAULT_SELECTION_ERROR, SELECTION_ERRORS


def ppl_increase(text: str) -> float:
    """'5%' or '0.05' -> 0.05."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a fraction (0.05) or a percentage (5%)") from None
    if value < 0:
        raise argparse.ArgumentTypeError("the perplexity increase must be >= 0")
    return value


def add_selection_error_option(parser: argparse.ArgumentParser) -> None:
    """--selection-error, for every command that ranks experts by least-error-first."""
    parser.add_argument("--selection-error", choices=SELECTION_ERRORS, default=DEFAULT_SELECTION_ERROR,
                        help="what least-error-first ranks by: model, the KL at the model's output with each expert alone "
                             "quantized (one pass over the calibration text per expert and precision); expert, each quantized "
                             f"expert's own output error (seconds, blind to how much the expert matters downstream) (default: {DEFAULT_SELECTION_ERROR})")


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="store folder (the plan is written into it as placement.json)")
    parser.add_argument("--device-memory", required=True,
                        help="bytes for every backbone and the resident experts: 800MB, 2GiB, or 0.6x (of all resident in bf16); "
                             "a configuration whose experts do not all fit is measured offloaded")
    parser.add_argument("--resident-only", action="store_true",
                        help="leave out configurations whose experts do not all fit the device memory instead of offloading them")
    parser.add_argument("--min-tokens-per-second", type=float, help="decode tokens/s floor on the planner's workload")
    parser.add_argument("--max-ppl-increase", type=ppl_increase, help="perplexity ceiling over all-bf16: 0.05 or 5%%")
    parser.add_argument("--plot", type=Path, help="write the frontier and the chosen point as a PNG here")
    parser.add_argument("--steps", type=int, default=4, help="int4 and int8 counts at multiples of 1/STEPS of the experts (default: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the measurements (default: 1)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE, help=f"int4 group size (default: {DEFAULT_GROUP_SIZE})")
    add_selection_error_option(parser)
    parser.add_argument("--json", type=Path, help="write the measured points, frontier and choice as JSON here")


def run_from_options(args: argparse.Namespace) -> int:
    """Plan, print the table, write --json."""
    import json

    from moeplex.planner.choice import Constraints
    from moeplex.planner.command import format_plan, run_plan
    from moeplex.planner.meter import MeterSettings

    constraints = Constraints(args.min_tokens_per_second, args.max_ppl_increase)
    result = run_plan(args.store, args.device_memory, constraints, args.plot, args.steps,
                      MeterSettings(threads=args.threads, group_size=args.group_size, selection_error=args.selection_error), args.resident_only)
    print(format_plan(result))
    if args.json is not None:
        summary = {
            "budget_bytes": result.budget_bytes,
            "reference": result.reference.to_json(),
            "points": [p.to_json() for p in result.points],
            "frontier": [p.to_json() for p in result.frontier],
            "chosen": result.chosen.to_json(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
