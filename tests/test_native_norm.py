"""moeplex's native RMSNorm (moeplex/model/native/rms_norm.c): torch's composed RMSNorm's answer in one call, and when it runs."""

import pytest
import torch

from moeplex.model import native_norm, ops

bf16 = torch.bfloat16
EPS = 1e-6


def composed(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    with native_norm.SWITCH.turned_off():
        return ops.rms_norm(x, weight, eps)


def bf16_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between a and b, elementwise (both finite bf16 of one sign or zero)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("shape,weight_rows", [((1, 1024), False), ((7, 96), False), ((5, 40), True), ((3, 4, 64), False)])
def test_it_gives_torchs_composed_answer(shape, weight_rows):
    generator = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(*shape, generator=generator) * 3).to(bf16)
    weight = torch.randn(*(shape if weight_rows else shape[-1:]), generator=generator).to(bf16)
    assert native_norm.fits(x, weight)
    out, reference = native_norm.rms_norm(x, weight, EPS), composed(x, weight, EPS)
    assert out.shape == x.shape and out.dtype == bf16
    # the same roundings in the same order; only the sum of squares runs in another order, which can move
    # the variance by a float32 rounding and so, rarely, a bf16 rounding by one step
    assert (out == reference).float().mean() >= 0.99
    assert (bf16_steps_apart(out, reference) <= 1).all()


def test_ops_rms_norm_takes_it_for_a_decode_step_and_torch_for_the_rest(monkeypatch):
    calls = []
    native = native_norm.rms_norm
    monkeypatch.setattr(native_norm, "rms_norm", lambda *args: calls.append(args) or native(*args))
    x, weight = torch.randn(2, 64).to(bf16), torch.randn(64).to(bf16)
    ops.rms_norm(x, weight, EPS)
    assert len(calls) == 1
    for other_x, other_weight in (
        (x.float(), weight.float()),  # fp32
        (torch.randn(64, 4096).to(bf16), torch.randn(4096).to(bf16)),  # a prefill chunk: torch's parallel ops pay
        (torch.randn(64, 2).to(bf16).T, torch.randn(64).to(bf16)),  # not contiguous
    ):
        assert not native_norm.fits(other_x, other_weight)
        assert torch.equal(ops.rms_norm(other_x, other_weight, EPS), composed(other_x, other_weight, EPS))
    assert len(calls) == 1


def test_a_non_finite_value_makes_its_row_non_finite_and_leaves_the_others():
    x, weight = torch.randn(3, 64).to(bf16), torch.randn(64).to(bf16)
    x[1, 5] = float("nan")
    out = native_norm.rms_norm(x, weight, EPS)
    assert out[1].isnan().all()
    assert (bf16_steps_apart(out[[0, 2]], composed(x[[0, 2]], weight, EPS)) <= 1).all()


def test_it_refuses_what_it_cannot_normalize():
    with pytest.raises(ValueError, match="takes contiguous bf16 x"):
        native_norm.rms_norm(torch.randn(2, 64), torch.randn(64), EPS)
    with pytest.raises(ValueError, match="takes contiguous bf16 x"):
        native_norm.rms_norm(torch.randn(2, 64).to(bf16), torch.randn(32).to(bf16), EPS)


def test_the_switch_turns_it_off():
    with native_norm.SWITCH.turned_off():
        assert not native_norm.available()
    assert native_norm.available()


def test_without_a_compiler_rms_norm_falls_back_to_torch(python_without_compiler):
    script = (
        "import warnings, torch\n"
        "from moeplex.model import native_norm, ops\n"
        "x, w = torch.randn(3, 64).bfloat16(), torch.randn(64).bfloat16()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    out = ops.rms_norm(x, w, 1e-6)\n"
        "x32 = x.float()\n"
        "reference = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)\n"
        "print(torch.equal(out, reference), native_norm.available(), any('could not be built' in str(w.message) for w in caught))\n"
    )
    assert python_without_compiler(script).split() == ["True", "False", "True"]
