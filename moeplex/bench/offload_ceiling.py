"""The ceiling of prediction in `moeplex bench offload`: the measured routing replayed for LRU and for an oracle.

The resident model records which experts each decode step used and how long its experts and the rest
of each layer took; LRU's run gives the disk's read speed. `moeplex.offload.replay` then times the same
routing at a budget for on-demand LRU and for an oracle that knows the future (Belady eviction, the
next layers' experts read ahead). The replayed LRU checks the timing model against the measured one;
the oracle's speed over it is what perfect prediction would give this design (reads ahead in the order of
use, eviction by next use) on this family and machine.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

import torch

from moeplex.bench.measure import median
from moeplex.offload.pool import PoolStats
from moeplex.offload.replay import Replayed, ReplayCosts, replay


class RoutingRecorder:
    """An expert door that runs another one and records, per forward pass, the keys each sparse layer used and the experts' time."""

    def __init__(self, inner, table: list[list[Hashable] | None]):
        self.inner, self.table = inner, table
        self.first_sparse = next(layer for layer, keys in enumerate(table) if keys is not None)
        self.steps: list[list[tuple[Hashable, ...]]] = []
        self.decode_expert_seconds = 0.0
        self.decode_expert_calls = 0
        self._timed: list[bool] = []
        self._request: list[int] = []  # each step's request: a new one begins at every prefill

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        decode = hidden.shape[0] == 1
        if layer == self.first_sparse:
            self.steps.append([])
            self._timed.append(decode)
            self._request.append((self._request[-1] if self._request else -1) + (not decode))
        experts = sorted(set(expert_ids.flatten().tolist()))
        self.steps[-1].append(tuple(self.table[layer][expert] for expert in experts))
        started = time.perf_counter()
        out = self.inner(layer, hidden, expert_ids, routing_weights)
        if decode:
            if out.is_cuda:  # time the experts' kernels, not only their launches
                torch.cuda.synchronize()
            self.decode_expert_seconds += time.perf_counter() - started
            self.decode_expert_calls += len(experts)
        return out

    @property
    def decode_steps(self) -> int:
        return sum(self._timed)

    def timed(self, skip_steps: int = 0) -> list[bool]:
        """Which recorded steps are decode steps, the first `skip_steps` steps counted as untimed (warm-up)."""
        return [flag and index >= skip_steps for index, flag in enumerate(self._timed)]

    def median_tokens_per_s(self, replayed: Replayed, skip_steps: int = 0) -> float:
        """The median over requests of a replay's decode tokens/s, as the benchmark reports measured speeds."""
        seconds: dict[int, list[float]] = {}
        timed_requests = [request for request, flag in zip(self._request, self.timed(skip_steps)) if flag]
        for request, step_seconds in zip(timed_requests, replayed.step_seconds):
            seconds.setdefault(request, []).append(step_seconds)
        return median([len(times) / sum(times) for times in seconds.values()])


def measured_costs(recorder: RoutingRecorder, resident_tokens_per_s: float, lru_stats: PoolStats) -> ReplayCosts:
    """Replay costs from the resident model's decode speed and recorded expert time, and LRU's disk reads."""
    if recorder.decode_steps == 0:
        raise ValueError("the recorder saw no decode step")
    if lru_stats.wait_seconds <= 0 or lru_stats.bytes_read["disk"] == 0:
        raise ValueError("LRU read nothing from disk at this budget: there is no read speed to replay with")
    sparse_layers = sum(keys is not None for keys in recorder.table)
    expert_seconds = recorder.decode_expert_seconds / recorder.decode_expert_calls
    other_per_step = 1.0 / resident_tokens_per_s - recorder.decode_expert_seconds / recorder.decode_steps
    return ReplayCosts(
        layer_seconds=max(other_per_step, 0.0) / sparse_layers,
        expert_seconds=expert_seconds,
        read_bytes_per_second=lru_stats.bytes_read["disk"] / lru_stats.wait_seconds,
    )


def prediction_ceiling(recorder: RoutingRecorder, costs: ReplayCosts, budget: int, nbytes: dict, skip_steps: int, windows: tuple[int, ...]) -> dict:
    """Replayed tokens/s of LRU and of the oracle at each window (0: Belady on demand only), and the oracle's over LRU's."""
    timed = recorder.timed(skip_steps)
    lru = replay(recorder.steps, timed, budget, nbytes, costs)
    lru_rate = recorder.median_tokens_per_s(lru, skip_steps)
    result = {"costs": vars(costs).copy(), "lru": lru_rate, "lru_misses_per_token": lru.misses_per_step, "oracle": {}}
    for window in dict.fromkeys(windows):  # once each: the benchmark's window may equal 0 or the layer count
        oracle = replay(recorder.steps, timed, budget, nbytes, costs, oracle_window=window)
        rate = recorder.median_tokens_per_s(oracle, skip_steps)
        result["oracle"][f"window_{window}"] = {
            "tokens_per_s": rate, "vs_lru": rate / lru_rate, "misses_per_token": oracle.misses_per_step, "reads_per_token": oracle.reads_per_step,
        }
    return result
