"""A bounded soak: mixed, streaming and cancelled requests from several clients under tight KV and backbone budgets."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import httpx
import pytest
import torch

from moeplex.engine import LLM
from moeplex.engine.kv_budget import kv_bytes_per_token
from moeplex.server import BackgroundServer, create_app
from moeplex.store import StoreReader
from tests.test_engine import wait_until
from tests.test_engine_store import build_serving_store, one_torch_thread  # noqa: F401 (autouse fixture)

SOAK_SECONDS = 90
CLIENTS = 6
VARIANTS = ("base", "python", "cpp")


def one_request(http: httpx.Client, rng: random.Random) -> str:
    """Send one randomly chosen request; return how it ended ('200', '429', 'cancelled', ...)."""
    variant = rng.choice(VARIANTS)
    kind = rng.choice(["completion", "chat-stream", "cancel", "invalid"])
    if kind == "completion":
        body = {"model": variant, "prompt": "x" * rng.randint(1, 30), "max_tokens": rng.randint(1, 30), "n": rng.randint(1, 2), "temperature": rng.random()}
        response = http.post("/v1/completions", json=body)
        if response.status_code == 200:
            assert len(response.json()["choices"]) == body["n"]
        return str(response.status_code)
    if kind == "invalid":
        response = http.post("/v1/completions", json={"model": rng.choice(["nope", variant]), "prompt": "a", "max_tokens": rng.choice([0, 10**6])})
        assert response.status_code in (400, 404)
        return str(response.status_code)
    body = {"model": variant, "messages": [{"role": "user", "content": "y" * rng.randint(1, 20)}], "max_tokens": rng.randint(5, 40), "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return str(response.status_code)
        lines = response.iter_lines()
        if kind == "cancel":
            next(lines)
            return "cancelled"
        events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    return "200"


@pytest.mark.slow
def test_soak_ends_with_every_request_answered_and_the_kv_cache_empty(tmp_path):
    store = build_serving_store(tmp_path)
    reader = StoreReader(store)
    two_backbones = 2 * reader.load_backbone("base", torch.float32).nbytes
    kv_bytes = 4 * 2 * 64 * kv_bytes_per_token(reader.spec("base"), 4)
    llm = LLM(
        store, dtype=torch.float32, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=48,
        kv_cache_bytes=kv_bytes, backbone_budget_bytes=two_backbones, max_pending_requests=10, policy="variant-fair",
    )
    outcomes: Counter[str] = Counter()
    failures: list[BaseException] = []
    deadline = time.monotonic() + SOAK_SECONDS

    def client(seed: int, url: str) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                try:
                    outcome = one_request(http, rng)
                except BaseException as exc:  # reported by the main thread
                    failures.append(exc)
                    return
                outcomes[outcome] += 1

    with BackgroundServer(create_app(llm)) as url:
        threads = [threading.Thread(target=client, args=(seed, url)) for seed in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[0]
        wait_until(lambda: llm.loop.stats().running == 0 and llm.loop.stats().waiting == 0, timeout=60)
        stats = llm.loop.stats()
        assert stats.kv_used_bytes == 0
        assert set(outcomes) <= {"200", "400", "404", "429", "cancelled"}, outcomes
        assert outcomes["200"] > 20 and outcomes["cancelled"] > 0, outcomes
        assert stats.aborted > 0 and stats.switches.switches > 0
        assert httpx.get(f"{url}/health").status_code == 200
