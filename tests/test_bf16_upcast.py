"""bf16 matmuls done in fp32 on CPUs that emulate bf16: when the rule upcasts, and that the answers stay bf16's."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moeplex.model import bf16_upcast
from moeplex.model.attention import _attend
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


def test_attention_rule_upcasts_one_query_with_large_heads_or_many_keys(emulated):
    one_query = torch.zeros(16, 1, 64, dtype=torch.bfloat16)  # [heads, queries, head_dim]
    assert bf16_upcast.attention_upcast_pays(one_query, 16)
    assert not bf16_upcast.attention_upcast_pays(torch.zeros(16, 2, 64, dtype=torch.bfloat16), 16)  # a prefill chunk
    small_heads = torch.zeros(4, 1, 32, dtype=torch.bfloat16)
    assert not bf16_upcast.attention_upcast_pays(small_heads, 1023)
    assert bf16_upcast.attention_upcast_pays(small_heads, 1024)
    assert not bf16_upcast.attention_upcast_pays(one_query.float(), 16)
    with bf16_upcast.SWITCH.turned_off():
        assert not bf16_upcast.attention_upcast_pays(one_query, 16)


def test_attention_rule_never_upcasts_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(bf16_upcast, "bf16_matmul_is_emulated", lambda: False)
    assert not bf16_upcast.attention_upcast_pays(torch.zeros(16, 1, 64, dtype=torch.bfloat16), 4096)


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


@pytest.mark.parametrize("keys", [5, 300])
def test_upcast_decode_attention_gives_the_bf16_answer(emulated, keys):
    """One query over bf16 keys and values: attended in fp32 and rounded once, it is the exact answer in bf16."""
    generator = torch.Generator().manual_seed(keys)
    spec = SimpleNamespace(sliding_window=None)  # all that attending one query reads of the spec
    q = torch.randn(8, 1, 64, generator=generator).bfloat16()
    k, v = (torch.randn(2, keys, 64, generator=generator).bfloat16() for _ in range(2))
    assert bf16_upcast.attention_upcast_pays(q, keys)
    out = _attend(spec, q, k, v, start=keys - 1)
    scores = torch.einsum("gqd,gkd->gqk", q.double().view(2, 4, 64), k.double()) / 8.0
    reference = torch.einsum("gqk,gkd->gqd", scores.softmax(-1), v.double()).reshape(8, 1, 64)
    assert out.dtype == torch.bfloat16
    assert within_bf16_rounding(out, reference)
    with bf16_upcast.SWITCH.turned_off():  # torch's bf16 attention: the same answer within its own roundings
        assert torch.allclose(_attend(spec, q, k, v, start=keys - 1).float(), out.float(), rtol=2 ** -6, atol=2e-2)
