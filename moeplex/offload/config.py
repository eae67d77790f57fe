"""Settings of expert offloading: budgets, eviction policy, prediction, prefetch, host execution."""

from __future__ import annotations

from dataclasses import dataclass

PREDICTIONS = ("none", "trace", "lookahead", "combined")
HOST_EXECUTION = ("auto", "never", "always")  # see moeplex.offload.host_execution
# Prefetch only experts at least this likely: where the disk is the bottleneck a wrong guess costs a whole
# read that a demand read may queue behind (0.95 against 0.8: moeplex / LRU 1.00-1.02x against 0.80-0.92x
# at a quarter of the bench family's experts, docs/offloading.md).
DEFAULT_MIN_PROBABILITY = 0.95


@dataclass(frozen=True)
class OffloadConfig:
    device_budget: int  # bytes of compute-ready experts (GPU memory on CUDA, RAM on CPU)
    host_budget: int = 0  # bytes of evicted experts kept in host RAM (pinned on CUDA); 0: none
    policy: str = "trace"  # lru | lfu | trace
    prediction: str = "combined"  # none | trace | lookahead | combined
    prefetch: bool = True  # a background thread fetches predicted experts
    window: int = 2  # sparse layers ahead that are predicted (and prefetched)
    min_probability: float = DEFAULT_MIN_PROBABILITY  # prefetch experts at least this likely
    lookahead_weight: float = 0.7  # share of router look-ahead in the combined prediction
    trace_capacity: int = 512  # traces the library keeps (oldest leave first)
    trace_matches: int = 8  # most similar library traces a prediction averages
    host_execution: str = "auto"  # experts in the host tier run there when cheaper than a copy: auto (GPU only) | never | always

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, not '{self.prediction}'")
        if self.prediction == "none" and (self.prefetch or self.policy == "trace"):
            raise ValueError("prefetching and the trace-aware policy need a prediction")
        if self.host_execution not in HOST_EXECUTION:
            raise ValueError(f"host_execution must be one of {', '.join(HOST_EXECUTION)}, not '{self.host_execution}'")
        if self.window < 1 or self.device_budget < 1:
            raise ValueError("window and device_budget must be positive")
