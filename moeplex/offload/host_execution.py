"""Whether a missing expert runs on the host instead of being copied to the device (the Fiddler idea), as policies.

On a GPU machine an expert evicted to the host tier can come back over the host-device link, or stay
where it is while the few tokens that need it go to the host and back. A decode step routes one or
two tokens to most experts, so moving megabytes of weights to multiply a handful of rows often costs
more than the multiply on the host. A policy sees the expert's bytes and its token count and chooses.
On a CPU-only machine the device is the host and nothing is gained: `make_host_execution` gives
`NeverOnHost` there unless asked for `always`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeplex.bench.measure import median, timed
from moeplex.offload.config import HOST_EXECUTION


class HostExecutionPolicy(Protocol):
    def run_on_host(self, nbytes: int, tokens: int) -> bool:
        """True to run an expert of nbytes (held in the host tier) on the host for `tokens` rows."""
        ...


class NeverOnHost:
    """Every expert is brought to the device (the plain pool)."""

    def run_on_host(self, nbytes: int, tokens: int) -> bool:
        return False


class AlwaysOnHost:
    """Every expert the host tier holds runs there (for machines whose link is far slower than their CPU, and tests)."""

    def run_on_host(self, nbytes: int, tokens: int) -> bool:
        return True


@dataclass(frozen=True)
class HostCostModel:
    """Runs on the host when that is estimated faster than copying the expert to the device.

    Host time: the larger of the multiply (2 flops per weight per token at host_flops_per_s) and one
    read of the weights at host_bytes_per_s. Copy time: the weights over the link at link_bytes_per_s.
    The device's multiply after a copy, which running on the host also saves, is left out, so the
    model errs towards copying.
    """

    host_flops_per_s: float
    host_bytes_per_s: float
    link_bytes_per_s: float
    bytes_per_weight: int

    def host_seconds(self, nbytes: int, tokens: int) -> float:
        flops = 2.0 * tokens * nbytes / self.bytes_per_weight
        return max(flops / self.host_flops_per_s, nbytes / self.host_bytes_per_s)

    def copy_seconds(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_s

    def run_on_host(self, nbytes: int, tokens: int) -> bool:
        return self.host_seconds(nbytes, tokens) < self.copy_seconds(nbytes)

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype, hidden: int = 1024, intermediate: int = 4096) -> HostCostModel:
        """Time this machine: a host matmul of an expert-sized matrix at 16 tokens and at 1, and a pinned copy to device."""
        weight = torch.randn(intermediate, hidden, dtype=dtype)
        many, one = torch.randn(16, hidden, dtype=dtype), torch.randn(1, hidden, dtype=dtype)
        torch.nn.functional.linear(many, weight)
        many_seconds = median([timed(lambda: torch.nn.functional.linear(many, weight)) for _ in range(5)])
        one_seconds = median([timed(lambda: torch.nn.functional.linear(one, weight)) for _ in range(5)])
        nbytes = weight.numel() * weight.element_size()
        pinned = weight.pin_memory() if device.type == "cuda" else weight
        pinned.to(device)
        copy_seconds = median([timed(lambda: pinned.to(device, non_blocking=True)) for _ in range(5)])
        return cls(
            host_flops_per_s=2.0 * 16 * weight.numel() / many_seconds,
            host_bytes_per_s=nbytes / one_seconds,
            link_bytes_per_s=nbytes / copy_seconds,
            bytes_per_weight=weight.element_size(),
        )


def make_host_execution(name: str, device, dtype: torch.dtype, host_budget: int = 1) -> HostExecutionPolicy:
    """auto: the measured cost model on a GPU, never on CPU; never; always. Never without a host tier (host_budget 0)."""
    if name not in HOST_EXECUTION:
        raise ValueError(f"host execution must be one of {', '.join(HOST_EXECUTION)}, not '{name}'")
    device = torch.device(device)
    if name == "never" or host_budget <= 0:
        return NeverOnHost()
    if name == "always":
        return AlwaysOnHost()
    if device.type == "cpu":
        return NeverOnHost()
    return HostCostModel.measure(device, dtype)  # only measured when there is a host tier to run from
