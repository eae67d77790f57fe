"""Assemble an offloaded model from a store or a checkpoint: backbone resident, experts behind an ExpertPool."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from moeplex.model.runtime import MoEModel
from moeplex.model.spec import ModelSpec
from moeplex.model.weights import Backbone, load_backbone, open_checkpoint
from moeplex.offload.config import OffloadConfig
from moeplex.offload.evaluation import PredictionScorer
from moeplex.offload.forecast import ExpertForecaster
from moeplex.offload.host_execution import make_host_execution
from moeplex.offload.offloaded import KeyTable, OffloadedExperts
from moeplex.offload.policies import make_policy
from moeplex.offload.pool import ExpertPool
from moeplex.offload.prediction import CombinedPredictor, RouterLookahead, TraceMatcher
from moeplex.offload.prefetcher import Prefetcher
from moeplex.offload.sources import (
    CheckpointExpertSource,
    ExpertSource,
    StoreExpertSource,
)
from moeplex.offload.tracing import TRACES_FOLDER, ActivationTracer, TraceLibrary
from moeplex.quant.formats import DEFAULT_GROUP_SIZE
from moeplex.store.layout import MANIFEST
from moeplex.store.manifest import Manifest
from moeplex.store.reader import StoreReader


def make_pool(source: ExpertSource, config: OffloadConfig, device="cpu") -> ExpertPool:
    """An empty pool over the source with the config's budgets and eviction policy (weighted by expert bytes)."""
    return ExpertPool(source, make_policy(config.policy, source.expert_nbytes), config.device_budget, config.host_budget, device)


def make_forecaster(
    spec: ModelSpec, backbone: Backbone, config: OffloadConfig, library: TraceLibrary, scorer: PredictionScorer | None = None
) -> ExpertForecaster | None:
    """A variant's forecaster (None when prediction is off); router look-ahead reads the later layers' routers of its backbone."""
    if config.prediction == "none":
        return None
    tracer = ActivationTracer(library)
    matcher = TraceMatcher(tracer, spec.top_k, config.trace_matches) if config.prediction in ("trace", "combined") else None
    routers = [layer.router for layer in backbone.layers]
    mlp_norms = [layer.mlp_norm for layer in backbone.layers]
    lookahead = RouterLookahead(routers, spec.top_k, mlp_norms, spec.rms_norm_eps) if config.prediction in ("lookahead", "combined") else None
    predictor = CombinedPredictor(matcher, lookahead, config.lookahead_weight)
    return ExpertForecaster(spec.sparse_layers, tracer, predictor, config.window, scorer)


def load_store_library(store: Path, spec: ModelSpec, config: OffloadConfig) -> TraceLibrary:
    """The store's saved trace library (`<store>/traces/`) when it has one, else an empty one."""
    if (store / TRACES_FOLDER).is_dir():
        return TraceLibrary.load(store / TRACES_FOLDER, config.trace_capacity)
    return TraceLibrary(spec.num_layers, spec.num_experts, config.trace_capacity)


def build_offloaded_experts(
    spec: ModelSpec,
    backbone: Backbone,
    table: KeyTable,
    source: ExpertSource,
    config: OffloadConfig,
    library: TraceLibrary | None = None,
    scorer: PredictionScorer | None = None,
    device="cpu",
) -> OffloadedExperts:
    """The expert door of one variant: its pool, and (per config) forecaster and prefetcher."""
    pool = make_pool(source, config, device)
    library = library if library is not None else TraceLibrary(spec.num_layers, spec.num_experts, config.trace_capacity)
    forecaster = make_forecaster(spec, backbone, config, library, scorer)
    prefetcher = Prefetcher(pool) if config.prefetch else None
    host_execution = make_host_execution(config.host_execution, device, source.dtype, config.host_budget)
    return OffloadedExperts(table, pool, forecaster, prefetcher, config.min_probability, host_execution)


def load_offloaded_model(
    path: str | Path,
    config: OffloadConfig,
    variant: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    scorer: PredictionScorer | None = None,
) -> MoEModel:
    """A model whose experts are offloaded: from a store (its `traces/` library loaded when present) or a checkpoint.

    The model's `.experts` is an OffloadedExperts; close() it when done (it may own a prefetch thread).
    """
    path = Path(path)
    library = None
    if (path / MANIFEST).is_file():
        reader = StoreReader(path)
        variant = variant or reader.variants[0]
        spec = reader.spec(variant)
        backbone = reader.load_backbone(variant, dtype, device)
        table: KeyTable = reader.expert_table(variant)
        source: ExpertSource = StoreExpertSource(path, reader.manifest, spec, dtype)
        library = load_store_library(path, spec, config)
    else:
        family, checkpoint, spec = open_checkpoint(path)
        backbone = load_backbone(family, checkpoint, spec, dtype, device)
        table = [[(layer, e) for e in range(spec.num_experts)] if sparse else None for layer, sparse in enumerate(spec.sparse_layers)]
        source = CheckpointExpertSource(family, checkpoint, spec, dtype)
    experts = build_offloaded_experts(spec, backbone, table, source, config, library, scorer, device)
    return MoEModel(spec, backbone, experts, dtype, device)


def offload_variant_models(
    store: Path,
    manifest: Manifest,
    models: Mapping[str, MoEModel],
    config: OffloadConfig,
    precision_of: Mapping[str, str] | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> dict[str, MoEModel]:
    """The variants' models (backbones shared with `models`) with their experts behind one pool over the store.

    A stored expert is resident at most once, in its precision (precision_of: expert id -> bf16 | int8 | int4);
    the variants share one prefetcher and the store's trace library, and each predicts with its own routers.
    Close every model's experts when done (closing the shared prefetcher twice is harmless).
    """
    first = next(iter(models.values()))
    source = StoreExpertSource(store, manifest, first.spec, first.dtype, precision_of, group_size)
    pool = make_pool(source, config, first.device)
    prefetcher = Prefetcher(pool) if config.prefetch else None
    library = load_store_library(store, first.spec, config) if config.prediction != "none" else None
    offloaded = {}
    for variant, model in models.items():
        forecaster = make_forecaster(model.spec, model.backbone, config, library) if library is not None else None
        experts = OffloadedExperts(manifest.expert_tables[variant], pool, forecaster, prefetcher, config.min_probability)
        offloaded[variant] = MoEModel(model.spec, model.backbone, experts, model.dtype, model.device)
    return offloaded
