"""bf16 matmuls done in fp32 on CPUs that emulate bf16: when the rule upcasts, and that the answers stay bf16's."""

import pytest
import torch
import torch.nn.functional as F

from moeplex.model import bf16_upcast
from moeplex.model.grouped import GroupedWeight, group_offsets, grouped_linear
from moeplex.model.ops import linear
from moeplex.switch import Switch


@pytest.fixture
def emulated():
    with bf16_upcast.assumed_emulated():
        yield


def test_rule_upcasts_prefill_sized_row_counts_and_later_for_larger_weights(emulated):
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert not bf16_upcast.upcast_pays(x, 8, 384 * 128)  # a decode batch stays bf16
    assert not bf16_upcast.upcast_pays(x, 63, 4096 * 1024)
    assert bf16_upcast.upcast_pays(x, 64, 4096 * 1024)
    assert not bf16_upcast.upcast_pays(x, 447, 14336 * 4096)
    assert bf16_upcast.upcast_pays(x, 448, 14336 * 4096)
    assert not bf16_upcast.upcast_pays(x.float(), 64, 384 * 128)  # fp32 is already fp32


def test_rule_never_upcasts_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(bf16_upcast, "bf16_matmul_is_emulated", lambda: False)
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert not bf16_upcast.upcast_pays(x, 1024, 64)
    with bf16_upcast.assumed_emulated():  # as benchmarks reproduce an AVX2-only CPU on a newer one
        assert bf16_upcast.upcast_pays(x, 1024, 64)
    assert not bf16_upcast.upcast_pays(x, 1024, 64)


def test_the_switch_turns_upcasting_off(emulated, monkeypatch):
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    with bf16_upcast.SWITCH.turned_off():
        assert not bf16_upcast.upcast_pays(x, 64, 384 * 128)
    assert bf16_upcast.upcast_pays(x, 64, 384 * 128)
    monkeypatch.setenv(bf16_upcast.SWITCH.variable, "0")
    monkeypatch.setattr(bf16_upcast, "SWITCH", Switch(bf16_upcast.SWITCH.variable))  # as a process started so
    assert not bf16_upcast.upcast_pays(x, 64, 384 * 128)


def within_bf16_rounding(out: torch.Tensor, reference: torch.Tensor) -> bool:
    """out is the reference rounded to bf16, give or take a unit in the last place and fp32 summation order."""
    return bool(((out.double() - reference).abs() <= 2 ** -7 * reference.abs() + 1e-3).all())


@pytest.mark.parametrize("rows", [64, 200])
def test_upcast_linear_gives_the_bf16_answer(emulated, rows):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=generator).bfloat16()
    weight = torch.randn(160, 96, generator=generator).bfloat16()
    bias = torch.randn(160, generator=generator).bfloat16()
    out = linear(x, weight, bias)
    assert out.dtype == torch.bfloat16
    assert within_bf16_rounding(out, x.double() @ weight.double().T + bias.double())
    assert torch.allclose(out.float(), F.linear(x, weight, bias).float(), rtol=2 ** -7, atol=1e-2)


def test_upcast_grouped_linear_gives_each_groups_bf16_answer(emulated):
    generator = torch.Generator().manual_seed(7)
    matrices = torch.randn(3, 64, 32, generator=generator).bfloat16()
    group_of_row = torch.tensor([0] * 70 + [1] * 90 + [2] * 50)
    x = torch.randn(len(group_of_row), 32, generator=generator).bfloat16()
    assert bf16_upcast.upcast_pays(x, len(x) / 3, 64 * 32)
    out = grouped_linear(x, GroupedWeight(matrices, group_offsets(group_of_row, 3)))
    reference = torch.einsum("tk,tnk->tn", x.double(), matrices[group_of_row].double())
    assert out.dtype == torch.bfloat16
    assert within_bf16_rounding(out, reference)


def test_bench_prefill_times_both_settings_at_every_prompt_length(tmp_path, capsys):
    import json

    from moeplex.cli import main
    from tests.conftest import saved_random_model

    saved_random_model(tmp_path / "model", seed=2)
    out = tmp_path / "prefill.json"
    args = ["bench", "prefill", "--model", str(tmp_path / "model"), "--prompt-tokens", "3", "9", "--repeats", "1",
            "--threads", "1", "--as-if-emulated", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["prefill_seconds"]) == {"fp32_matmuls", "bf16_matmuls"}
    assert all(set(times) == {"3", "9"} and min(times.values()) > 0 for times in result["prefill_seconds"].values())
    assert result["bf16_emulated"] == bf16_upcast.bf16_matmul_is_emulated()
    assert result["as_if_emulated"]
    x = torch.zeros(1, 8, dtype=torch.bfloat16)
    assert bf16_upcast.upcast_pays(x, 64, 64) == bf16_upcast.bf16_matmul_is_emulated()  # the assumption ended with the run
    assert "speedup" in capsys.readouterr().out
