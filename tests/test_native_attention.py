"""moeplex's native decode attention (moeplex/model/native/decode_attention.c): rotary, cache write and attention of one
decode token in one call, torch's answer, and when the runtime takes it."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from moeplex.model import native_attention
from moeplex.model.attention import SequenceChunk
from moeplex.model.kv_cache import SequenceKVCache
from moeplex.model.rope import apply_rotary
from moeplex.model.runtime import load_model

bf16 = torch.bfloat16
LAYER = 1
needs_kernel = pytest.mark.skipif(not native_attention.available(), reason="the native decode attention is not built here")


def float32_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float32: q [Hq, 1, D], keys and values [Hkv, L, D]."""
    return F.scaled_dot_product_attention(q.float()[None], keys.float()[None], values.float()[None], enable_gqa=True)[0]


def close_to(out: torch.Tensor, reference: torch.Tensor) -> bool:
    """Within one rounding to bf16 of a float32 result whose sums ran in another order."""
    return bool(((out.float() - reference).abs() <= 2**-8 * reference.abs() + 1e-5).all())


def decode_inputs(heads: int, kv_heads: int, position: int, head_dim: int, seed: int):
    """A token's q [Hq, D], k and v [Hkv, D], cos / signed sin [1, D] at `position`, and a cache holding random keys
    and values before it (three layers, room for a few more positions)."""
    generator = torch.Generator().manual_seed(seed)
    spec = SimpleNamespace(num_layers=3, num_kv_heads=kv_heads, head_dim=head_dim)
    cache = SequenceKVCache(spec, bf16, capacity=position + 5)
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=generator) * 2)
    cache.values.copy_(torch.randn(cache.values.shape, generator=generator) * 2)
    q, k, v = (torch.randn(n, head_dim, generator=generator).to(bf16) for n in (heads, kv_heads, kv_heads))
    angles = torch.rand(head_dim // 2, generator=generator) * 6.3
    sin = torch.cat([-angles.sin(), angles.sin()])
    return q, k, v, torch.cat([angles, angles]).cos().to(bf16)[None], sin.to(bf16)[None], cache


@needs_kernel
@pytest.mark.parametrize("heads,kv_heads,position,head_dim", [(16, 4, 47, 64), (4, 4, 0, 32), (8, 2, 300, 128), (6, 1, 2047, 16), (4, 2, 9, 24)])
def test_it_rotates_writes_and_attends_as_torch_does(heads, kv_heads, position, head_dim):
    q, k, v, cos, sin, cache = decode_inputs(heads, kv_heads, position, head_dim, seed=heads * position + head_dim)
    earlier = cache.keys.clone(), cache.values.clone()
    out = torch.empty(heads, head_dim, dtype=bf16)
    native_attention.rotate_write_attend(q, k, v, cos, sin, cache, LAYER, position, out)

    rotated_q, rotated_k = apply_rotary(q[None], cos[None], sin[None])[0], apply_rotary(k[None], cos[None], sin[None])[0]
    assert torch.equal(cache.keys[LAYER, :, position], rotated_k)  # torch's rotation, bit for bit (24: one channel at a time)
    assert torch.equal(cache.values[LAYER, :, position], v)
    written = torch.zeros(cache.keys.shape, dtype=torch.bool)
    written[LAYER, :, position] = True
    assert torch.equal(cache.keys[~written], earlier[0][~written]) and torch.equal(cache.values[~written], earlier[1][~written])
    keys, values = cache.keys[LAYER, :, : position + 1], cache.values[LAYER, :, : position + 1]
    assert close_to(out[:, None], float32_reference(rotated_q[:, None], keys, values))


@needs_kernel
def test_a_nan_in_a_cached_key_makes_only_the_heads_that_read_it_nan():
    q, k, v, cos, sin, cache = decode_inputs(8, 4, 10, 32, seed=3)
    cache.keys[LAYER, 1, 4, 7] = float("nan")
    out = torch.empty(8, 32, dtype=bf16)
    native_attention.rotate_write_attend(q, k, v, cos, sin, cache, LAYER, 10, out)
    assert out[2:4].isnan().all()  # query heads 2 and 3 share kv head 1
    others = [0, 1, 4, 5, 6, 7]
    rotated_q = apply_rotary(q[None], cos[None], sin[None])[0]
    reference = float32_reference(rotated_q[:, None], cache.keys[LAYER, :, :11], cache.values[LAYER, :, :11])
    assert close_to(out[others, None], reference[others])


def step(heads: int, kv_heads: int, head_dim: int, start: int, tokens: int = 1, capacity: int = 64, dtype=bf16):
    """A decode step's q, k, v rows, cos and sin as `moeplex.model.attention.attention` passes them, over one chunk."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    spec = SimpleNamespace(num_layers=2, num_kv_heads=kv_heads, head_dim=head_dim)
    chunks = [SequenceChunk(SequenceKVCache(spec, dtype, capacity=capacity), start, tokens)]
    cos, sin = (torch.randn(tokens, 1, head_dim).to(dtype) for _ in range(2))
    return q.view(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim), v.reshape(tokens, kv_heads, head_dim), cos, sin, chunks


@needs_kernel
def test_a_step_is_taken_only_when_every_sequence_decodes_one_token_that_it_can_compute():
    assert native_attention.takes_decode_step(*step(16, 4, 64, start=20), window=None)
    assert native_attention.takes_decode_step(*step(16, 4, 64, start=20), window=21)  # the window holds all 21 keys
    longest = native_attention.MAX_KEYS - 1
    assert native_attention.takes_decode_step(*step(4, 2, 32, start=longest, capacity=longest + 1), window=None)
    refused = {
        "a prefill chunk": (step(16, 4, 64, start=0, tokens=6), None),
        "float32": (step(16, 4, 64, start=20, dtype=torch.float32), None),
        "a sliding window shorter than the keys": (step(16, 4, 64, start=20), 20),
        "more keys than MAX_KEYS": (step(4, 2, 32, start=longest + 1, capacity=longest + 2), None),
        "head_dim not a multiple of 8": (step(4, 2, 12, start=3), None),
        "heads not a multiple of kv heads": (step(3, 2, 32, start=3), None),
    }
    for what, (arguments, window) in refused.items():
        assert not native_attention.takes_decode_step(*arguments, window=window), what
    with native_attention.SWITCH.turned_off():
        assert not native_attention.takes_decode_step(*step(16, 4, 64, start=20), window=None)


@needs_kernel
def test_every_layer_of_a_bf16_decode_step_takes_it_and_writes_the_cache_as_torch_does(hf_checkpoint, monkeypatch):
    name, folder, hf_model = hf_checkpoint
    model = load_model(folder, dtype=bf16)
    generator = torch.Generator().manual_seed(len(name))
    prompt = torch.randint(0, hf_model.config.vocab_size, (9,), generator=generator)

    def prefill_and_decode(decode_steps: int) -> SequenceKVCache:
        cache = model.new_cache()
        model.forward(prompt, [SequenceChunk(cache, 0, len(prompt))])
        for position in range(decode_steps):
            model.forward(prompt[position : position + 1], [SequenceChunk(cache, cache.length, 1)])
        return cache

    with native_attention.SWITCH.turned_off():
        torch_cache = prefill_and_decode(3)
    calls = []
    native = native_attention.rotate_write_attend
    monkeypatch.setattr(native_attention, "rotate_write_attend", lambda *args: calls.append(args) or native(*args))
    cache = prefill_and_decode(3)
    assert len(calls) == 3 * model.spec.num_layers, name  # the prefill's nine queries went through SDPA
    # the first layer's inputs are the same on both paths, so its new keys and values are the same bits
    assert torch.equal(cache.keys[0, :, 9:12], torch_cache.keys[0, :, 9:12]), name
    assert torch.equal(cache.values[0, :, 9:12], torch_cache.values[0, :, 9:12]), name
    for q, k, v, cos, sin, call_cache, layer, position, out in calls:  # each over the sequence's cache, in place
        assert call_cache is cache and position in (9, 10, 11)
        rotated_q = apply_rotary(q[None], cos[None], sin[None])[0]
        reference = float32_reference(rotated_q[:, None], cache.keys[layer, :, : position + 1], cache.values[layer, :, : position + 1])
        assert close_to(out[:, None], reference), name


def test_without_a_compiler_decode_steps_take_the_torch_path(python_without_compiler):
    script = (
        "import warnings\n"
        "from moeplex.model import native_attention\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    available = native_attention.available()\n"
        "print(available, any('could not be built' in str(w.message) for w in caught))\n"
    )
    assert python_without_compiler(script).split() == ["False", "True"]
