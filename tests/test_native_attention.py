"""moeplex's native decode attention (moeplex/model/native/decode_attention.c): SDPA's answer for one token, and when it runs."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moeplex.model import attention, native_attention
from moeplex.model.attention import SequenceChunk
from moeplex.model.runtime import load_model

bf16 = torch.bfloat16
needs_kernel = pytest.mark.skipif(not native_attention.available(), reason="the native decode attention is not built here")


def float32_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.float()[None], keys.float()[None], values.float()[None], enable_gqa=True)[0]


def cache_slice(kv_heads: int, length: int, head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """[kv_heads, length, head_dim] bf16 that lies in a larger cache, as a layer of SequenceKVCache does."""
    cache = (torch.randn(3, kv_heads, length + 9, head_dim, generator=generator) * 2).to(bf16)
    return cache[1, :, :length]


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,length,head_dim", [(16, 4, 47, 64), (4, 4, 1, 32), (8, 2, 300, 128), (6, 1, 2048, 16)])
def test_it_gives_float32_attentions_answer_rounded_to_bf16(heads, kv_heads, length, head_dim):
    generator = torch.Generator().manual_seed(heads * length + head_dim)
    q = torch.randn(heads, 1, head_dim, generator=generator).to(bf16)
    keys, values = cache_slice(kv_heads, length, head_dim, generator), cache_slice(kv_heads, length, head_dim, generator)
    assert native_attention.fits(q, keys, values) and (kv_heads == 1 or not keys.is_contiguous())
    out = native_attention.decode_attention(q, keys, values)
    reference = float32_reference(q, keys, values)
    assert out.shape == q.shape and out.dtype == bf16
    # one rounding to bf16 of a float32 result whose sums run in another order: within bf16's half step and a little
    tolerance = 2**-8 * reference.abs() + 1e-5
    assert ((out.float() - reference).abs() <= tolerance).all()


@needs_kernel
def test_a_nan_key_makes_only_the_heads_that_read_it_nan():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(8, 1, 32, generator=generator).to(bf16)
    keys, values = cache_slice(4, 10, 32, generator), cache_slice(4, 10, 32, generator)
    keys[1, 4, 7] = float("nan")
    out = native_attention.decode_attention(q, keys, values)
    assert out[2:4].isnan().all()  # query heads 2 and 3 share kv head 1
    others = [0, 1, 4, 5, 6, 7]
    assert not out[others].isnan().any()
    assert torch.allclose(out[others].float(), float32_reference(q, keys, values)[others], rtol=2**-7, atol=1e-5)


def test_it_refuses_what_it_cannot_compute():
    q, kv = torch.randn(4, 1, 32).to(bf16), torch.randn(2, 5, 32).to(bf16)
    assert native_attention.fits(q, kv, kv)
    refused = {
        "float32": (q.float(), kv.float(), kv.float()),
        "two queries": (torch.randn(4, 2, 32).to(bf16), kv, kv),
        "heads not a multiple of kv heads": (torch.randn(3, 1, 32).to(bf16), kv, kv),
        "head_dim not a multiple of 8": (torch.randn(4, 1, 12).to(bf16), torch.randn(2, 5, 12).to(bf16), torch.randn(2, 5, 12).to(bf16)),
        "too many keys": (q, torch.randn(2, native_attention.MAX_KEYS + 1, 32).to(bf16), torch.randn(2, native_attention.MAX_KEYS + 1, 32).to(bf16)),
        "no keys": (q, kv[:, :0], kv[:, :0]),
        "keys and values of different shapes": (q, kv, kv[:, :4]),
        "rows not contiguous": (q, kv.transpose(1, 2).contiguous().transpose(1, 2), kv),
    }
    for what, (query, keys, values) in refused.items():
        assert not native_attention.fits(query, keys, values), what
        with pytest.raises(ValueError, match="native decode attention takes"):
            native_attention.decode_attention(query, keys, values)


@needs_kernel
def test_attention_takes_it_for_a_decode_token_and_sdpa_for_the_rest(monkeypatch):
    calls = []
    native = native_attention.decode_attention
    monkeypatch.setattr(native_attention, "decode_attention", lambda *args: calls.append(args) or native(*args))
    spec, windowed = SimpleNamespace(sliding_window=None), SimpleNamespace(sliding_window=4)
    q, kv = torch.randn(8, 1, 32).to(bf16), torch.randn(2, 6, 32).to(bf16)
    out = attention._attend(spec, q, kv, kv, 5)
    assert len(calls) == 1
    assert torch.allclose(out.float(), float32_reference(q, kv, kv), rtol=2**-7, atol=1e-5)
    attention._attend(spec, torch.randn(8, 6, 32).to(bf16), kv, kv, 0)  # six queries under a causal mask
    attention._attend(windowed, q, kv, kv, 5)  # a sliding window shorter than the keys: masked
    with native_attention.SWITCH.turned_off():
        attention._attend(spec, q, kv, kv, 5)
    assert len(calls) == 1


@needs_kernel
def test_a_bf16_decode_step_runs_it_in_every_layer_on_the_cache(hf_checkpoint, monkeypatch):
    name, folder, hf_model = hf_checkpoint
    model = load_model(folder, dtype=bf16)
    generator = torch.Generator().manual_seed(len(name))
    prompt = torch.randint(0, hf_model.config.vocab_size, (9,), generator=generator)
    calls = []
    native = native_attention.decode_attention
    monkeypatch.setattr(native_attention, "decode_attention", lambda *args: calls.append((args, native(*args))) or calls[-1][1])
    cache = model.new_cache()
    model.forward(prompt, [SequenceChunk(cache, 0, len(prompt))])
    assert not calls  # the prefill's nine queries go through SDPA
    for step in range(3):
        model.forward(prompt[step : step + 1], [SequenceChunk(cache, cache.length, 1)])
    assert len(calls) == 3 * model.spec.num_layers, name
    for (q, keys, values), out in calls:  # each read the cache in place, over the keys cached so far
        assert keys.shape[1] in (10, 11, 12) and keys.untyped_storage().data_ptr() == cache.keys.untyped_storage().data_ptr()
        reference = float32_reference(q, keys, values)
        assert ((out.float() - reference).abs() <= 2**-8 * reference.abs() + 1e-5).all(), name


def test_without_a_compiler_attention_falls_back_to_sdpa(python_without_compiler):
    script = (
        "import warnings, torch\n"
        "from types import SimpleNamespace\n"
        "from moeplex.model import attention, native_attention\n"
        "q, kv = torch.randn(4, 1, 32).bfloat16(), torch.randn(2, 5, 32).bfloat16()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    same = torch.equal(attention._attend(SimpleNamespace(sliding_window=None), q, kv, kv, 4), attention._sdpa(q, kv, kv, None))\n"
        "print(same, native_attention.available(), any('could not be built' in str(w.message) for w in caught))\n"
    )
    assert python_without_compiler(script).split() == ["True", "False", "True"]
