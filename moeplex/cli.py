"""The `moeplex` command: demo family, generate, eval, consolidate, merge, verify, export, bench, plan, serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moeplex.dtypes import DTYPE_CHOICES, DTYPE_HELP
from moeplex.errors import MoeplexError
from moeplex.results import write_json


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except (MoeplexError, ValueError) as exc:
        print(f"moeplex: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeplex",
        description="Serve many fine-tuned variants of one Mixture-of-Experts LLM from one process.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_demo(commands)
    _add_generate(commands)
    _add_eval(commands)
    _add_consolidate(commands)
    _add_store_tools(commands)
    _add_bench(commands)
    _add_plan(commands)
    _add_serve(commands)
    return parser


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="the built-in demo family (built from local text, no downloads)")
    demo_commands = demo.add_subparsers(title="demo commands", metavar="COMMAND")
    build = demo_commands.add_parser(
        "build",
        help="train (tiny) or generate (bench) the demo family into the cache folder",
        description="Build the demo family: a BPE tokenizer and a Mixtral-architecture base trained on local "
        "text (Python stdlib, torch C++ headers, Python docs, license files), plus one fine-tuned variant per "
        "domain. 'bench' makes randomly initialized >=300M-parameter models for speed benchmarks. Cached under "
        "$MOEPLEX_CACHE (default ~/.cache/moeplex); an existing complete build is reused.",
    )
    build.add_argument("--size", choices=("tiny", "bench"), default="tiny", help="which family (default: tiny)")
    build.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    build.set_defaults(handler=_demo_build)
    serve = demo_commands.add_parser(
        "serve",
        help="build what is missing (family, consolidated store) and serve the demo family (what `make run` does)",
        description="Build the tiny demo family and its consolidated store if missing, print a curl line and an "
        "openai client snippet, then serve every variant over the OpenAI-compatible API.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.set_defaults(handler=_demo_serve)


def _demo_build(args) -> int:
    from moeplex.demo import build_demo_family

    family = build_demo_family(size=args.size, seed=args.seed, force=args.force)
    print(f"demo family '{args.size}' at {family.root}")
    print(f"  base: {family.base}")
    for name, path in family.variants.items():
        print(f"  {name}: {path} (fine-tuned on {family.own_domain[name]})")
    return 0


def _demo_serve(args) -> int:
    from moeplex.demo.stores import demo_store
    from moeplex.main_job import usage_snippets

    store = demo_store()
    print(usage_snippets(args.host, args.port, "python"), flush=True)
    return main(["serve", str(store), "--host", args.host, "--port", str(args.port)])


def _add_generate(commands) -> None:
    gen = commands.add_parser(
        "generate",
        help="load models and generate a completion for a prompt with each",
        description="Load each model (checkpoint folders or demo variant names; default: every model of the "
        "tiny demo family, building it if missing) and generate for one prompt each.",
    )
    gen.add_argument("models", nargs="*", help="checkpoint folders or demo model names (base, python, ...)")
    gen.add_argument("--prompt", help="prompt text (default: a prompt in each variant's own domain)")
    gen.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default: 48)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help=DTYPE_HELP)
    gen.set_defaults(handler=_generate)


def _generate(args) -> int:
    from moeplex.main_job import generate_for_each_model

    generate_for_each_model(args)
    return 0


def _add_eval(commands) -> None:
    evaluate = commands.add_parser("eval", help="quality evaluation")
    eval_commands = evaluate.add_subparsers(title="eval commands", metavar="COMMAND")
    ppl = eval_commands.add_parser(
        "ppl",
        help="perplexity per model and domain on held-out text",
        description="Perplexity of each model on each demo domain's held-out text (never used for training), "
        "through the moeplex runtime. With no models named, evaluates the tiny demo family.",
    )
    ppl.add_argument("models", nargs="*", help="checkpoint folders or demo model names (default: the demo family)")
    ppl.add_argument("--json", type=Path, help="write {models: {NAME: {DOMAIN: ppl}}, own_domain: {...}} here")
    ppl.add_argument("--max-tokens", type=int, default=4096, help="held-out tokens per domain (default: 4096)")
    ppl.add_argument("--window", type=int, default=256, help="tokens per scored window (default: 256)")
    ppl.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help=DTYPE_HELP)
    ppl.set_defaults(handler=_eval_ppl)


def _eval_ppl(args) -> int:
    from moeplex.dtypes import resolve_dtype
    from moeplex.eval.domains import PerplexityReport, evaluate_models
    from moeplex.main_job import resolve_models

    models, own_domain = resolve_models(args.models)
    report = PerplexityReport(
        evaluate_models(models, max_tokens=args.max_tokens, window=args.window, dtype=resolve_dtype(args.dtype)),
        own_domain,
    )
    print(report.table())
    write_json(args.json, report.to_json())
    return 0


def _add_consolidate(commands) -> None:
    consolidate = commands.add_parser(
        "consolidate",
        help="share similar experts across variants under a byte budget and write a store",
        description="Analyse the family (weight and output similarity of every expert position), choose which "
        "positions share one stored expert under the budget, and write the store. 'moeplex consolidate sweep "
        "[FAMILY]' instead measures quality across budgets for every method and merging baseline.",
    )
    consolidate.add_argument("family", nargs="?", help="family YAML, or 'sweep' (default family: the tiny demo)")
    consolidate.add_argument("sweep_family", nargs="?", help=argparse.SUPPRESS)
    consolidate.add_argument("--budget", default="2x", help="bytes for the store: e.g. 1.5x (one model), 800MB (default: 2x)")
    consolidate.add_argument("--out", type=Path, help="store folder to write")
    consolidate.add_argument("--method", choices=("quality-aware", "l2-roundrobin"), default="quality-aware")
    consolidate.add_argument("--report", action="store_true", help="also evaluate and write a quality report")
    consolidate.add_argument("--report-dir", type=Path, help="where the report goes (default: OUT.report)")
    consolidate.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    consolidate.add_argument("--max-tokens", type=int, default=2048, help="held-out tokens per domain for quality")
    consolidate.add_argument("--json", type=Path, help="write the summary (or the sweep) as JSON here")
    consolidate.set_defaults(handler=_consolidate)

    merge = commands.add_parser(
        "merge",
        help="merge variants into one checkpoint (average, task-arithmetic, ties, dare): the baselines",
        description="Merge the family's variants into one Hugging Face checkpoint folder with a model-merging method.",
    )
    merge.add_argument("method", choices=("average", "task-arithmetic", "ties", "dare"))
    merge.add_argument("family", nargs="?", type=Path, help="family YAML (default: the tiny demo family)")
    merge.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    merge.set_defaults(handler=_merge)


def _consolidate(args) -> int:
    from moeplex.consolidate.command import run_budget_sweep, run_consolidate
    from moeplex.consolidate.sweep import format_sweep

    if args.family == "sweep":
        family = Path(args.sweep_family) if args.sweep_family else None
        work_dir = args.out or Path(".moeplex-sweep")
        result = run_budget_sweep(family, work_dir, max_tokens=args.max_tokens)
        print(format_sweep(result))
        write_json(args.json, result)
        return 0
    if args.sweep_family or args.out is None:
        raise MoeplexError("usage: moeplex consolidate [FAMILY] --out STORE [--budget B] [--report]")
    report_dir = args.report_dir or (args.out.with_name(args.out.name + ".report") if args.report else None)
    summary = run_consolidate(
        Path(args.family) if args.family else None, args.budget, args.out, args.method, report_dir,
        args.max_tokens, args.overwrite, "moeplex " + " ".join(sys.argv[1:]),
    )
    for key, value in summary.items():
        print(f"{key}: {value}")
    write_json(args.json, summary)
    return 0


def _merge(args) -> int:
    from moeplex.consolidate.command import resolve_family
    from moeplex.consolidate.merge import METHODS_NEEDING_BASE, merge_checkpoints

    _, family = resolve_family(args.family)
    base = family.base if args.method in METHODS_NEEDING_BASE else None
    print(merge_checkpoints(args.method, list(family.variants.values()), args.out, base=base))
    return 0


def _add_store_tools(commands) -> None:
    verify = commands.add_parser("verify", help="check every checksum and reference of a store")
    verify.add_argument("store", type=Path)
    verify.set_defaults(handler=_verify)
    export = commands.add_parser("export", help="write one variant of a store as a Hugging Face checkpoint")
    export.add_argument("store", type=Path)
    export.add_argument("variant")
    export.add_argument("out", type=Path)
    export.set_defaults(handler=_export)


def _verify(args) -> int:
    from moeplex.store.verify import verify_store

    problems = verify_store(args.store)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"{args.store}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def _export(args) -> int:
    from moeplex.store.export import export_variant

    print(export_variant(args.store, args.variant, args.out))
    return 0


def _add_bench(commands) -> None:
    from moeplex.bench.options import add_bench_commands

    bench = commands.add_parser("bench", help="benchmarks (print a table; --json writes the numbers)")
    add_bench_commands(bench.add_subparsers(title="benchmarks", metavar="BENCHMARK"))


def _add_plan(commands) -> None:
    from moeplex.planner.options import add_plan_options

    plan = commands.add_parser(
        "plan",
        help="choose each expert's precision (int4 / int8 / bf16) for a device budget and constraints",
        description="Measure decode tokens/s and held-out perplexity of the store's expert-precision configurations "
        "under the device memory (experts beyond it offloaded, unless --resident-only; which experts get lower precision "
        "is least-error-first, by calibration text; measurements cached in the store), draw the Pareto frontier, choose "
        "the configuration meeting the constraints and write it to STORE/placement.json, which the engine loads.",
    )
    add_plan_options(plan)
    plan.set_defaults(handler=_plan)


def _plan(args) -> int:
    from moeplex.planner.options import run_from_options

    return run_from_options(args)


def _add_serve(commands) -> None:
    from moeplex.server.options import add_serve_options

    serve = commands.add_parser("serve", help="serve every variant of a store over an OpenAI-compatible HTTP API")
    add_serve_options(serve)
    serve.set_defaults(handler=_serve)


def _serve(args) -> int:
    from moeplex.server.options import serve_from_options

    serve_from_options(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
