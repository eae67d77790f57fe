"""The OpenAI-compatible server over a real socket, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from moeplex.engine import LLM
from moeplex.model.sampling import SamplingParams
from moeplex.server import BackgroundServer, ServerSettings, create_app
from tests.test_engine import wait_until
from tests.test_engine_store import build_serving_store, one_torch_thread  # noqa: F401 (autouse fixture)

API_KEY = "test-key"
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_serving_store(tmp_path_factory.mktemp("serve_http"))


@pytest.fixture(scope="module")
def server(store):
    """(base url, app) of a server with an API key."""
    llm = LLM(store, dtype=torch.float32, max_model_len=MAX_MODEL_LEN, max_num_seqs=8)
    app = create_app(llm, ServerSettings(api_key=API_KEY))
    with BackgroundServer(app) as url:
        yield url, app


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=API_KEY, max_retries=0)


def post(server, path: str, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server[0]}{path}", content=content, headers=headers | {"Content-Type": "application/json"}, timeout=60)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def engine_stats(server):
    return server[1].state.server.llm.loop.stats()


def test_models_lists_every_variant_with_base_as_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "python", "cpp"}
    assert models["python"].model_extra["parent"] == "base" and models["base"].model_extra["parent"] is None


def test_start_up_freezes_the_loaded_objects_out_of_the_collector(server):
    import gc

    llm = server[1].state.server.llm
    assert gc.get_freeze_count() > 0
    assert all(o is not llm for o in gc.get_objects())  # full collections no longer walk it


def test_completions_for_every_variant_honour_max_tokens_and_usage(client):
    for variant in ("base", "python", "cpp"):
        response = client.completions.create(model=variant, prompt="def add(a, b):", max_tokens=5, temperature=0)
        choice = response.choices[0]
        assert choice.finish_reason in ("stop", "length") and response.model == variant
        assert response.usage.prompt_tokens == len("def add(a, b):")
        assert 1 <= response.usage.completion_tokens <= 5
        assert (choice.finish_reason == "length") == (response.usage.completion_tokens == 5)


def test_greedy_is_deterministic_and_variants_differ(client):
    texts = {
        v: client.completions.create(model=v, prompt="int main() {", max_tokens=12, temperature=0).choices[0].text
        for v in ("base", "python", "cpp")
    }
    again = client.completions.create(model="python", prompt="int main() {", max_tokens=12, temperature=0).choices[0].text
    assert again == texts["python"]
    assert len(set(texts.values())) > 1


def test_seed_n_and_logprobs(client):
    kwargs = dict(model="base", prompt="hello", max_tokens=6, temperature=1.0, top_p=0.9, seed=3, n=3, logprobs=2)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    logprobs = first.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) >= 1
    assert all(lp <= 0 for lp in logprobs.token_logprobs) and all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == first.choices[0].text


def test_stop_strings_cut_the_text(client):
    free = client.completions.create(model="cpp", prompt="abc", max_tokens=12, temperature=0).choices[0].text
    assert len(free) >= 4
    stopped = client.completions.create(model="cpp", prompt="abc", max_tokens=12, temperature=0, stop=[free[2:4]]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[: free.find(free[2:4])]


def test_chat_uses_the_chat_template(client):
    response = client.chat.completions.create(
        model="python", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    assert response.usage.prompt_tokens == len("<user>hi\n<assistant>")
    message = response.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert "".join(item.token for item in response.choices[0].logprobs.content) == message.content


def test_streaming_completion_and_chat_match_the_full_reply(client):
    full = client.completions.create(model="cpp", prompt="for (", max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model="cpp", prompt="for (", max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=6, temperature=0)
    stream = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "x"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    with httpx.stream(
        "POST", f"{server[0]}/v1/completions", json={"model": "base", "prompt": "a", "max_tokens": 3, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_error_envelopes(server):
    ok = {"model": "base", "prompt": "a", "max_tokens": 2}
    assert_error(post(server, "/v1/completions", ok | {"model": "gpt-9"}), 404, "model")
    assert_error(post(server, "/v1/completions", ok | {"temperature": -1}), 400, "temperature")
    assert_error(post(server, "/v1/completions", ok | {"top_p": 0}), 400, "top_p")
    assert_error(post(server, "/v1/completions", ok | {"max_tokens": 0}), 400, "max_tokens")
    assert_error(post(server, "/v1/completions", ok | {"n": 99}), 400, "n")
    assert_error(post(server, "/v1/completions", ok | {"stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    assert_error(post(server, "/v1/completions", {"prompt": "a"}), 400, "model")
    assert_error(post(server, "/v1/completions", b"{not json"), 400)
    too_long = assert_error(post(server, "/v1/completions", ok | {"prompt": "a" * MAX_MODEL_LEN}), 400, "prompt")
    assert too_long["code"] == "context_length_exceeded"
    assert_error(post(server, "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "a" * 80}]}), 400, "messages")
    assert_error(post(server, "/v1/chat/completions", {"model": "base", "messages": []}), 400, "messages")
    assert_error(post(server, "/v1/completions", ok | {"prompt": [10**6]}), 400, "prompt")
    assert_error(post(server, "/v1/completions", ok, key=None), 401)
    assert_error(post(server, "/v1/completions", ok, key="wrong"), 401)
    assert_error(httpx.get(f"{server[0]}/v1/nothing"), 404)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt="a", temperature=5)
    assert info.value.body["param"] == "temperature"


def test_health_and_metrics(server, client):
    client.completions.create(model="python", prompt="abc", max_tokens=3)
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{server[0]}/metrics").text
    for name in (
        'moeplex_time_to_first_token_seconds_count{variant="python"}',
        'moeplex_time_per_output_token_seconds_bucket{le="0.005",variant="python"}',
        'moeplex_e2e_request_latency_seconds_count{variant="python"}',
        'moeplex_request_queue_time_seconds_count{variant="python"}',
        "moeplex_num_requests_running ",
        "moeplex_num_requests_waiting ",
        "moeplex_backbone_switches_total ",
        'moeplex_expert_bytes{tier="device"}',
    ):
        assert name in metrics, name


def test_disconnect_mid_stream_cancels_and_frees_the_cache(server):
    body = {"model": "base", "prompt": "z", "max_tokens": 60, "temperature": 0.7, "seed": 1, "stream": True}
    aborted_before = engine_stats(server).aborted
    with httpx.stream("POST", f"{server[0]}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        next(response.iter_lines())
    wait_until(lambda: engine_stats(server).aborted == aborted_before + 1)
    stats = engine_stats(server)
    assert stats.running == stats.waiting == stats.kv_used_bytes == 0
    full = post(server, "/v1/completions", body | {"stream": False}).json()
    assert full["choices"][0]["finish_reason"] == "length", "uncancelled, the stream would have run 60 tokens"


@pytest.fixture
def tight_server(store):
    """A server that holds one pending sequence at most."""
    llm = LLM(store, dtype=torch.float32, max_model_len=512, max_pending_requests=1)
    app = create_app(llm, ServerSettings(retry_after_seconds=2))
    with BackgroundServer(app) as url:
        yield url, app


def test_queue_full_is_429_with_retry_after_and_draining_is_503(tight_server):
    llm = tight_server[1].state.server.llm
    filler = SamplingParams(max_tokens=500, ignore_eos=True)  # still running when the next request arrives
    seq_id = llm.loop.submit("base", [1, 2], filler, on_output=lambda output: None)
    response = post(tight_server, "/v1/completions", {"model": "base", "prompt": "a"}, key=None)
    assert_error(response, 429)
    assert response.headers["retry-after"] == "2"
    llm.loop.abort(seq_id)
    wait_until(lambda: llm.loop.stats().running == llm.loop.stats().waiting == 0)
    assert post(tight_server, "/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 2}, key=None).status_code == 200
    tight_server[1].state.server.begin_drain()
    assert_error(post(tight_server, "/v1/completions", {"model": "base", "prompt": "a"}, key=None), 503)
    assert_error(httpx.get(f"{tight_server[0]}/health"), 503)


def test_shutdown_lets_running_streams_finish(store):
    llm = LLM(store, dtype=torch.float32, max_model_len=MAX_MODEL_LEN)
    app = create_app(llm)
    background = BackgroundServer(app)
    body = {"model": "base", "prompt": "z", "max_tokens": 60, "temperature": 0.7, "seed": 1, "stream": True}
    with background as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            background.server.handle_exit(None, None)  # what SIGTERM does
            rest = [line for line in lines if line]
        assert app.state.server.draining
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    assert llm.loop.stopped


def test_background_server_connections_send_small_writes_at_once():
    """Nagle's algorithm on the accepted sockets would hold each response's second write for the client's
    delayed ACK (~40 ms on Linux), which inflated every time to first token measured through this server."""
    import socket
    import types

    from fastapi import FastAPI

    app = FastAPI()
    app.state.server = types.SimpleNamespace(begin_drain=lambda: None)
    app.get("/ping")(lambda: {"ok": True})
    background = BackgroundServer(app)
    with background as url, httpx.Client(base_url=url) as http:
        assert http.get("/ping").json() == {"ok": True}
        sockets = [connection.transport.get_extra_info("socket") for connection in background.server.server_state.connections]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
