"""Command-line options of `moeplex serve` (argparse only, so building the CLI parser stays light)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moeplex.cores import serving_threads
from moeplex.dtypes import DTYPE_CHOICES, DTYPE_HELP, resolve_dtype
from moeplex.scheduling_choices import POLICIES as SCHEDULING_POLICIES
from moeplex.scheduling_choices import PREFILL_MODES
from moeplex.offload.config import HOST_EXECUTION

MIB = 2**20
POLICIES = ("lru", "lfu", "trace")


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="store folder written by `moeplex consolidate`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--api-key", default=os.environ.get("MOEPLEX_API_KEY"), help="require 'Authorization: Bearer KEY' on /v1 (default: $MOEPLEX_API_KEY; none: no check)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help=DTYPE_HELP)
    parser.add_argument("--policy", choices=SCHEDULING_POLICIES, default="fcfs", help="scheduling policy (default: fcfs)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="sequences per step (default: 16)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256, help="tokens per step; longer prompts are prefilled in chunks (default: 256)")
    parser.add_argument("--prefill", choices=PREFILL_MODES, default="separate",
                        help="separate: new prompts get steps of their own and running sequences decode in the steps between (a new "
                             "request waits for no decode; each prefill delays the decodes one step); mixed: prompts join the decode "
                             "steps (default: separate)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="prompt + completion tokens (default: 2048 or the model's limit if smaller)")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache budget in MiB (default: 512)")
    parser.add_argument("--backbone-budget-mib", type=int, help="device MiB for resident backbones (default: all variants resident)")
    parser.add_argument("--max-pending", type=int, default=256, help="running + waiting sequences before 429 (default: 256)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests may take to finish on shutdown (default: 30)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads for the engine (torch.set_num_threads; default: one per core less one, left to the HTTP server)")
    offload = parser.add_argument_group(
        "expert offloading",
        "With --expert-budget-mib, routed experts are not all loaded: every variant's experts come from one pool over the "
        "store's expert files (an expert shared by variants is held once), fetched layer by layer as the routers ask for "
        "them, predicted from traces and the routers, and prefetched by a background thread. Any budget that holds one "
        "expert works; smaller budgets read more from disk.",
    )
    offload.add_argument("--expert-budget-mib", type=float, metavar="MIB", help="device MiB for compute-ready experts (GPU memory on CUDA, RAM on CPU; default: every expert resident, no offloading)")
    offload.add_argument("--host-budget-mib", type=float, metavar="MIB", help="MiB of host RAM (pinned on CUDA) that keeps experts evicted from the device, so they are not read from disk again (default: 0, none)")
    offload.add_argument("--offload-policy", choices=POLICIES, help="expert eviction: lru, lfu, or trace (lowest predicted reuse x transfer cost; default)")
    offload.add_argument("--no-prefetch", action="store_true", help="fetch experts only when a layer needs them (default: prefetch predicted experts)")
    offload.add_argument(
        "--host-execution", choices=HOST_EXECUTION,
        help="run an expert held in the host tier on the CPU for the few tokens that need it instead of copying it to the GPU: "
             "auto (when this machine's measured CPU and link speeds say it is faster; GPU only; default), never, or always",
    )


def serve_from_options(args: argparse.Namespace) -> None:
    from moeplex.engine import EngineConfig
    from moeplex.server.app import ServerSettings
    from moeplex.server.serve import serve
    from moeplex.store import StoreReader

    reader = StoreReader(args.store)
    spec = reader.spec(reader.variants[0])
    model_limit = spec.max_position_embeddings
    dtype = resolve_dtype(args.dtype)
    expert_budget = offload_budget(args, spec.expert_numel * dtype.itemsize)
    config = EngineConfig(
        dtype=dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=min(args.max_model_len, model_limit),
        kv_cache_bytes=args.kv_cache_mib * MIB,
        backbone_budget_bytes=None if args.backbone_budget_mib is None else args.backbone_budget_mib * MIB,
        policy=args.policy,
        max_pending_requests=args.max_pending,
        expert_budget_bytes=expert_budget,
        offload=None if expert_budget is None else offload_config(args, expert_budget),
        threads=serving_threads() if args.threads is None else args.threads,
        prefill=args.prefill,
    )
    settings = ServerSettings(api_key=args.api_key, drain_timeout_seconds=args.drain_timeout)
    print(f"serving {', '.join(reader.variants)} from {args.store} on http://{args.host}:{args.port}/v1", flush=True)
    serve(args.store, args.host, args.port, settings, config)


def offload_budget(args: argparse.Namespace, expert_bytes: int) -> int | None:
    """Device bytes for experts from --expert-budget-mib (None: all resident); ValueError when it cannot hold one expert."""
    if args.expert_budget_mib is None:
        given = [flag for flag, value in (("--host-budget-mib", args.host_budget_mib), ("--offload-policy", args.offload_policy), ("--no-prefetch", args.no_prefetch), ("--host-execution", args.host_execution)) if value]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --expert-budget-mib")
        return None
    budget = int(args.expert_budget_mib * MIB)
    if budget < expert_bytes:
        raise ValueError(
            f"--expert-budget-mib {args.expert_budget_mib:g} cannot hold one expert ({expert_bytes / MIB:.3f} MiB each in {args.dtype}); "
            "give at least that much, or leave the flag out to keep every expert resident"
        )
    return budget


def offload_config(args: argparse.Namespace, budget: int):
    """OffloadConfig of the flags; with LRU or LFU and no prefetch nothing uses predictions, so none are made."""
    from moeplex.offload.config import OffloadConfig

    policy = args.offload_policy or "trace"
    prediction = "none" if args.no_prefetch and policy != "trace" else "combined"
    host = int((args.host_budget_mib or 0) * MIB)
    return OffloadConfig(
        device_budget=budget, host_budget=host, policy=policy, prediction=prediction, prefetch=not args.no_prefetch,
        host_execution=args.host_execution or "auto",
    )
