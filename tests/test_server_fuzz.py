"""Hypothesis-generated malformed and extreme request bodies: never a 5xx, and the server still answers."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeplex.engine import LLM
from moeplex.server import BackgroundServer, create_app
from tests.test_engine import wait_until
from tests.test_engine_store import build_serving_store, one_torch_thread  # noqa: F401 (autouse fixture)

NUM_BODIES = 520

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
extreme_ints = st.sampled_from([-1, 0, 1, 2, 3, 63, 64, 65, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30])
extreme_floats = st.sampled_from([-1e308, -1.0, 0.0, 1e-320, 0.5, 1.0, 2.0, 2.0001, 1e308])
models = st.sampled_from(["base", "python", "cpp", "", "gpt-4", "base\x00", "../base"]) | json_values
prompts = (
    st.text(max_size=80)
    | st.lists(st.text(max_size=10), max_size=3)
    | st.lists(st.integers(-5, 200), max_size=8)
    | st.lists(st.lists(st.integers(-5, 200), max_size=4), max_size=3)
    | json_values
)
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "robot"]) | json_values, "content": st.text(max_size=60) | json_values}),
    max_size=3,
) | json_values

common = {
    "model": models,
    "max_tokens": extreme_ints | json_values,
    "temperature": extreme_floats | json_values,
    "top_p": extreme_floats | json_values,
    "n": extreme_ints,
    "seed": extreme_ints | json_values,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=3), max_size=6) | json_values,
    "stream": st.booleans() | json_values,
    "logprobs": extreme_ints | st.booleans() | json_values,
    "top_logprobs": extreme_ints,
    "stream_options": st.just({"include_usage": True}) | json_values,
}
completion_bodies = st.fixed_dictionaries({}, optional=common | {"prompt": prompts})
chat_bodies = st.fixed_dictionaries({}, optional=common | {"messages": messages, "max_completion_tokens": extreme_ints})
valid_completion = st.fixed_dictionaries(
    {"model": st.sampled_from(["base", "python", "cpp"]), "prompt": st.text(min_size=1, max_size=12), "max_tokens": st.integers(1, 6)},
    optional={"temperature": st.floats(0, 2), "n": st.integers(1, 3), "stream": st.booleans(), "seed": st.integers(0, 2**32)},
)
valid_chat = st.fixed_dictionaries(
    {"model": st.sampled_from(["base", "python", "cpp"]), "messages": st.just([{"role": "user", "content": "hi"}]), "max_tokens": st.integers(1, 6)},
    optional={"top_p": st.floats(0.01, 1), "stream": st.booleans(), "logprobs": st.booleans()},
)


def one_field_changed(valid: st.SearchStrategy, fields: dict) -> st.SearchStrategy:
    """A valid body with one field set to an extreme or ill-typed value."""
    return st.tuples(valid, st.sampled_from(sorted(fields))).flatmap(lambda vk: fields[vk[1]].map(lambda value: vk[0] | {vk[1]: value}))


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), valid_completion.map(json.dumps)),
    st.tuples(st.just("/v1/chat/completions"), valid_chat.map(json.dumps)),
    st.tuples(st.just("/v1/completions"), one_field_changed(valid_completion, common | {"prompt": prompts}).map(json.dumps)),
    st.tuples(st.just("/v1/chat/completions"), one_field_changed(valid_chat, common | {"messages": messages}).map(json.dumps)),
    st.tuples(st.just("/v1/completions"), completion_bodies.map(json.dumps)),
    st.tuples(st.just("/v1/chat/completions"), chat_bodies.map(json.dumps)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), json_values.map(json.dumps) | st.binary(max_size=60)),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = build_serving_store(tmp_path_factory.mktemp("serve_fuzz"))
    llm = LLM(store, dtype=torch.float32, max_model_len=32, max_num_seqs=16)
    app = create_app(llm)
    with BackgroundServer(app) as url:
        yield url, llm


def test_malformed_and_extreme_bodies_never_cause_a_server_error(server):
    url, llm = server
    statuses = []
    with httpx.Client(base_url=url, timeout=60) as http:

        @settings(max_examples=NUM_BODIES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(requests)
        def send(request):
            path, body = request
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
            statuses.append(response.status_code)
            assert response.status_code < 500, (body, response.text)
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        send()
        assert len(statuses) >= NUM_BODIES
        assert {200, 400} <= set(statuses)
        ok = http.post("/v1/completions", json={"model": "base", "prompt": "still there?", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None
    wait_until(lambda: llm.loop.stats().running == 0 and llm.loop.stats().kv_used_bytes == 0)
