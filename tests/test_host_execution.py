"""Host execution: the cost model's choice, the policies a config names, and greedy outputs when experts run on the host."""

import pytest
import torch

from moeplex.model.runtime import load_model
from moeplex.offload.config import OffloadConfig
from moeplex.offload.host_execution import AlwaysOnHost, HostCostModel, NeverOnHost, make_host_execution
from tests.test_offload_model import greedy, mixtral_checkpoint, offloaded_greedy, prompts  # noqa: F401 (fixture)

MB = 1_000_000
# a GPU machine's shape: a 16-core host at 400 GFLOP/s and 50 GB/s, a 25 GB/s link, bf16 weights
GPU_MACHINE = HostCostModel(host_flops_per_s=400e9, host_bytes_per_s=50e9, link_bytes_per_s=25e9, bytes_per_weight=2)


def test_few_tokens_run_on_the_host_and_many_are_worth_the_copy():
    expert = 48 * MB  # a Mixtral-8x7B expert in bf16
    assert GPU_MACHINE.run_on_host(expert, tokens=1)
    # copy: 48 MB at 25 GB/s = 1.92 ms; host: 2 flops x 24M weights x tokens at 400 GFLOP/s = 0.12 ms per token
    assert GPU_MACHINE.run_on_host(expert, tokens=15)
    assert not GPU_MACHINE.run_on_host(expert, tokens=17)
    assert not GPU_MACHINE.run_on_host(expert, tokens=512)


def test_a_fast_link_or_a_slow_host_keeps_experts_on_the_device():
    fast_link = HostCostModel(400e9, 50e9, link_bytes_per_s=200e9, bytes_per_weight=2)
    slow_host = HostCostModel(host_flops_per_s=400e9, host_bytes_per_s=10e9, link_bytes_per_s=25e9, bytes_per_weight=2)
    assert not fast_link.run_on_host(48 * MB, tokens=1)  # reading the weights on the host alone is slower than the copy
    assert not slow_host.run_on_host(48 * MB, tokens=1)


def test_measured_cost_model_has_this_machines_rates():
    model = HostCostModel.measure(torch.device("cpu"), torch.float32, hidden=256, intermediate=512)
    assert model.host_flops_per_s > 0 and model.host_bytes_per_s > 0 and model.link_bytes_per_s > 0
    assert model.bytes_per_weight == 4


def test_config_names_the_policy_and_cpu_gains_nothing_from_auto():
    assert isinstance(make_host_execution("auto", "cpu", torch.bfloat16), NeverOnHost)
    assert isinstance(make_host_execution("never", "cpu", torch.bfloat16), NeverOnHost)
    assert isinstance(make_host_execution("always", "cpu", torch.bfloat16), AlwaysOnHost)
    assert isinstance(make_host_execution("always", "cpu", torch.bfloat16, host_budget=0), NeverOnHost)  # no host tier
    with pytest.raises(ValueError, match="host execution must be one of auto, never, always"):
        make_host_execution("sometimes", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="host_execution must be one of"):
        OffloadConfig(device_budget=1, host_execution="sometimes")


@pytest.mark.parametrize("budget_experts", [1, 3])
def test_experts_run_on_the_host_tier_give_the_resident_greedy_outputs(mixtral_checkpoint, budget_experts):  # noqa: F811
    resident = load_model(mixtral_checkpoint, dtype=torch.float32)
    batch = prompts(seed=60 + budget_experts)
    expert_bytes = resident.spec.expert_numel * 4
    config = OffloadConfig(
        device_budget=budget_experts * expert_bytes, host_budget=64 * expert_bytes, policy="lru", prediction="none",
        prefetch=False, host_execution="always",
    )
    got, pool = offloaded_greedy(mixtral_checkpoint, config, batch)
    assert got == greedy(resident, batch)
    assert pool.stats.host_executions > 0 and pool.stats.host_executed_tokens >= pool.stats.host_executions
    assert pool.stats.bytes_read["host"] == 0  # what the host tier held ran there and never went back to the device
