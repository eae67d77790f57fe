"""Command-line options of `moeplex serve` (argparse only, so building the CLI parser stays light)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MIB = 2**20


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="store folder written by `moeplex consolidate`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--api-key", default=os.environ.get("MOEPLEX_API_KEY"), help="require 'Authorization: Bearer KEY' on /v1 (default: $MOEPLEX_API_KEY; none: no check)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="compute dtype (default: bf16)")
    parser.add_argument("--policy", choices=("fcfs", "variant-fair"), default="fcfs", help="scheduling policy (default: fcfs)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="sequences per step (default: 16)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=256, help="tokens per step; longer prompts are prefilled in chunks (default: 256)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="prompt + completion tokens (default: 2048 or the model's limit if smaller)")
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache budget in MiB (default: 512)")
    parser.add_argument("--backbone-budget-mib", type=int, help="device MiB for resident backbones (default: all variants resident)")
    parser.add_argument("--max-pending", type=int, default=256, help="running + waiting sequences before 429 (default: 256)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds running requests may take to finish on shutdown (default: 30)")


def serve_from_options(args: argparse.Namespace) -> None:
    import torch

    from moeplex.engine import EngineConfig
    from moeplex.server.app import ServerSettings
    from moeplex.server.serve import serve
    from moeplex.store import StoreReader

    reader = StoreReader(args.store)
    model_limit = reader.spec(reader.variants[0]).max_position_embeddings
    config = EngineConfig(
        dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=min(args.max_model_len, model_limit),
        kv_cache_bytes=args.kv_cache_mib * MIB,
        backbone_budget_bytes=None if args.backbone_budget_mib is None else args.backbone_budget_mib * MIB,
        policy=args.policy,
        max_pending_requests=args.max_pending,
    )
    settings = ServerSettings(api_key=args.api_key, drain_timeout_seconds=args.drain_timeout)
    print(f"serving {', '.join(reader.variants)} from {args.store} on http://{args.host}:{args.port}/v1", flush=True)
    serve(args.store, args.host, args.port, settings, config)
