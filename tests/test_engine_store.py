"""A small served family for engine and server tests: a base and two variants in a store, with a chat tokenizer."""

from __future__ import annotations

import string

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moeplex.consolidate.family_spec import load_family_spec
from moeplex.store import StoreReader, write_store
from tests.conftest import family_configs, make_hf_model
from tests.test_store import TUNED, perturb, shared_plan

EOS = "<eos>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run many small ops: one thread avoids stalls at OpenMP barriers on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One printable ASCII character per token, an end-of-sequence token, and a chat template."""
    chars = "\n" + string.printable[:95]
    vocab = {c: i for i, c in enumerate(chars)} | {EOS: len(chars)}
    vocab |= {chr(0x4E00 + i): i for i in range(len(vocab), vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_serving_store(root, family: str = "mixtral"):
    """Store with variants base, python, cpp (python and cpp share a merged expert), tokenizer included."""
    config = family_configs()[family]
    tokenizer = text_tokenizer(config.vocab_size)
    config.eos_token_id = tokenizer.convert_tokens_to_ids(EOS)
    make_hf_model(config, seed=7).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    for seed, (variant, positions) in enumerate(TUNED.items(), start=1):
        model = make_hf_model(config, seed=7)
        perturb(model, positions, seed)
        model.save_pretrained(root / variant)
    data = {"name": f"serve-{family}", "base": "base", "variants": {v: v for v in TUNED}}
    (root / "family.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return write_store(load_family_spec(root / "family.yaml"), shared_plan(load_family_spec(root / "family.yaml")), root / "store", progress=False)


def test_serving_store_has_variants_sharing_experts_and_a_chat_tokenizer(tmp_path):
    store = build_serving_store(tmp_path)
    reader = StoreReader(store)
    assert reader.variants == ["base", *TUNED]
    assert reader.expert_table("python")[0][1] == reader.expert_table("cpp")[0][1] != reader.expert_table("base")[0][1]
    tokenizer = AutoTokenizer.from_pretrained(store / "tokenizer")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<user>hi\n<assistant>"
    assert tokenizer.decode(tokenizer("ab c")["input_ids"]) == "ab c"
    assert tokenizer.eos_token_id == reader.spec("base").eos_token_ids[0] < reader.spec("base").vocab_size
