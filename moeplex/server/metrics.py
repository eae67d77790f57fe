"""Prometheus metrics: per-variant latency histograms observed per request, engine gauges read at scrape time."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moeplex.engine.engine import EngineStats
from moeplex.engine.outputs import RequestOutput
from moeplex.offload.pool import PoolStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineCollector:
    """Reads the engine's counters when Prometheus scrapes, so gauges are never stale."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        for name, doc, value in (
            ("moeplex_num_requests_running", "Sequences in the running batch", stats.running),
            ("moeplex_num_requests_waiting", "Sequences waiting to be scheduled", stats.waiting),
            ("moeplex_kv_cache_used_bytes", "Bytes of KV cache held by live sequences", stats.kv_used_bytes),
            ("moeplex_kv_cache_capacity_bytes", "KV cache byte budget", stats.kv_capacity_bytes),
            ("moeplex_resident_backbones", "Backbones resident on the device", len(stats.resident_backbones)),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        experts = GaugeMetricFamily("moeplex_expert_bytes", "Bytes of experts per tier", labels=["tier"])
        for tier, value in stats.expert_bytes.items():
            experts.add_metric([tier], value)
        yield experts
        switches = stats.switches
        yield CounterMetricFamily("moeplex_backbone_switches", "Backbones brought in while a step waited", value=switches.switches)
        yield CounterMetricFamily("moeplex_backbone_switch_seconds", "Time steps waited for backbone switches", value=switches.switch_seconds)
        yield CounterMetricFamily("moeplex_backbone_load_seconds", "Time spent loading backbones, background included", value=switches.load_seconds)
        yield CounterMetricFamily("moeplex_backbone_prefetch_hits", "Switches served by a background load", value=switches.prefetch_hits)
        yield CounterMetricFamily("moeplex_preemptions", "Sequences preempted for KV cache space", value=stats.preemptions)
        yield CounterMetricFamily("moeplex_aborted_sequences", "Sequences cancelled before they finished", value=stats.aborted)
        yield CounterMetricFamily("moeplex_failed_sequences", "Sequences ended by an error (an expert they needed could not be read)", value=stats.failed)
        if stats.offload is not None:
            yield GaugeMetricFamily("moeplex_expert_budget_bytes", "Device bytes for experts (changed live by PUT /admin/expert-budget)", value=stats.expert_budget_bytes)
            yield from offload_metrics(stats.offload)


def offload_metrics(pool: PoolStats):
    """The expert pool's counters (only with offloading on)."""
    demands = CounterMetricFamily("moeplex_expert_demands", "Experts a layer needed, by how they were found", labels=["result"])
    for result, value in (("hit", pool.hits), ("miss", pool.misses), ("late_prefetch", pool.late_prefetches)):
        demands.add_metric([result], value)
    yield demands
    yield GaugeMetricFamily("moeplex_expert_hit_rate", "Share of expert demands already on the device", value=pool.hit_rate)
    yield GaugeMetricFamily("moeplex_expert_prefetch_accuracy", "Prefetched bytes used before eviction / prefetched bytes used or evicted", value=pool.prefetch_accuracy)
    read = CounterMetricFamily("moeplex_expert_read_bytes", "Bytes of experts fetched, by the tier they came from", labels=["tier"])
    for tier, value in pool.bytes_read.items():
        read.add_metric([tier], value)
    yield read
    for name, doc, value in (
        ("moeplex_expert_wait_seconds", "Time steps waited for experts to become resident", pool.wait_seconds),
        ("moeplex_expert_evictions", "Experts evicted from the device", pool.evictions),
        ("moeplex_expert_prefetched_bytes", "Bytes of experts prefetched", pool.prefetched_bytes),
        ("moeplex_expert_prefetch_used_bytes", "Prefetched bytes that a layer then used", pool.prefetch_used_bytes),
        ("moeplex_expert_prefetch_wasted_bytes", "Prefetched bytes evicted unused", pool.prefetch_wasted_bytes),
        ("moeplex_expert_prefetch_errors", "Prefetches whose read failed", pool.prefetch_errors),
        ("moeplex_expert_host_executions", "Experts run on the host tier's copy instead of being copied to the device", pool.host_executions),
        ("moeplex_expert_host_executed_tokens", "Token rows of experts run on the host", pool.host_executed_tokens),
    ):
        yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """One registry per app (tests run several apps in one process)."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry()
        labels = ["variant"]

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=self.registry)

        self.ttft = histogram("moeplex_time_to_first_token_seconds", "Time from arrival to the first generated token")
        self.tpot = histogram("moeplex_time_per_output_token_seconds", "Mean time between generated tokens of a request")
        self.e2e = histogram("moeplex_e2e_request_latency_seconds", "Time from arrival to the last token")
        self.queue = histogram("moeplex_request_queue_time_seconds", "Time from arrival to first scheduling")
        self.requests = Counter("moeplex_requests", "Finished sequences", ["variant", "finish_reason"], registry=self.registry)
        self.rejections = Counter("moeplex_rejected_requests", "Requests refused before running", ["status"], registry=self.registry)
        self.registry.register(EngineCollector(stats))

    def observe_finished(self, output: RequestOutput) -> None:
        variant, times = output.variant, output.times
        self.requests.labels(variant, output.finish_reason).inc()
        if times.first_scheduled is not None:
            self.queue.labels(variant).observe(times.first_scheduled - times.arrival)
        if times.first_token is None or times.finished is None:
            return
        self.ttft.labels(variant).observe(times.first_token - times.arrival)
        self.e2e.labels(variant).observe(times.finished - times.arrival)
        if len(output.token_ids) > 1:
            self.tpot.labels(variant).observe((times.finished - times.first_token) / (len(output.token_ids) - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
