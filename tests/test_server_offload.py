"""The server with offloaded experts over a real socket: offloading metrics, and an unreadable expert file."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moeplex.cores import serving_threads
from moeplex.engine import LLM
from moeplex.server import BackgroundServer, ServerSettings, create_app
from moeplex.store import StoreReader
from tests.test_engine_offload import python_only_expert
from tests.test_engine_store import build_serving_store, one_torch_thread  # noqa: F401 (autouse fixture)
from tests.test_server import API_KEY, assert_error, post

PROMPTS = {
    "base": "def main():\n    return 0",
    "python": "import os\nfor name in os.listdir('.'):\n    print(name)",
    "cpp": "int main() { return 0; }",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_serving_store(tmp_path_factory.mktemp("serve_offload"))


def offloaded_server(store, budget_experts: int = 3):
    expert_bytes = StoreReader(store).spec("base").expert_numel * 4
    llm = LLM(store, dtype=torch.float32, max_model_len=64, max_num_seqs=8, expert_budget_bytes=budget_experts * expert_bytes)
    return BackgroundServer(create_app(llm, ServerSettings(api_key=API_KEY)))


def complete(url: str, variant: str, max_tokens: int = 8, stream: bool = False) -> httpx.Response:
    body = {"model": variant, "prompt": PROMPTS[variant], "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    return post((url, None), "/v1/completions", body)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the /metrics page."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_report_the_expert_pool(store):
    with offloaded_server(store) as url:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda v: complete(url, v), list(PROMPTS) * 2))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        values = metrics(url)
    demands = {result: values[("moeplex_expert_demands_total", (("result", result),))] for result in ("hit", "miss", "late_prefetch")}
    assert demands["miss"] > 0 and demands["hit"] > 0
    assert values[("moeplex_expert_hit_rate", ())] == pytest.approx(demands["hit"] / sum(demands.values()))
    assert 0.0 <= values[("moeplex_expert_prefetch_accuracy", ())] <= 1.0
    assert values[("moeplex_expert_prefetched_bytes_total", ())] >= values[("moeplex_expert_prefetch_used_bytes_total", ())]
    expert_bytes = StoreReader(store).spec("base").expert_numel * 4
    tiers = {tier: values[("moeplex_expert_bytes", (("tier", tier),))] for tier in ("device", "host", "disk")}
    assert 0 < tiers["device"] <= 3 * expert_bytes and tiers["host"] == 0 and tiers["disk"] > 3 * expert_bytes
    assert values[("moeplex_expert_read_bytes_total", (("tier", "disk"),))] > tiers["device"]  # budget of 3: experts are read again
    assert values[("moeplex_expert_wait_seconds_total", ())] > 0
    assert values[("moeplex_expert_host_executions_total", ())] == 0  # CPU: the device is the host
    assert values[("moeplex_expert_evictions_total", ())] > 0
    assert values[("moeplex_failed_sequences_total", ())] == 0


def test_an_unreadable_expert_file_fails_only_the_requests_that_need_it(store, tmp_path):
    copy = shutil.copytree(store, tmp_path / "store")
    broken = python_only_expert(copy)
    with offloaded_server(copy) as url:
        blob = copy / StoreReader(copy).manifest.experts[broken].file
        blob.write_bytes(blob.read_bytes()[:100])  # damaged after start-up
        with ThreadPoolExecutor(4) as pool:  # one mixed batch
            replies = dict(zip(["python", "base", "cpp", "python-stream"], pool.map(
                lambda args: complete(url, *args), [("python",), ("base",), ("cpp",), ("python", 8, True)]
            )))
        error = assert_error(replies["python"], 500)
        assert error["code"] == "generation_failed" and broken in error["message"] and str(blob) in error["message"]
        for variant in ("base", "cpp"):
            assert replies[variant].status_code == 200 and replies[variant].json()["choices"][0]["finish_reason"] == "length"
        events = [line[len("data: "):] for line in replies["python-stream"].text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "generation_failed"
        assert httpx.get(f"{url}/health").status_code == 200  # the server goes on serving
        assert complete(url, "base").json()["choices"][0]["text"] == replies["base"].json()["choices"][0]["text"]
        values = metrics(url)
        assert values[("moeplex_failed_sequences_total", ())] == 2
        assert values[("moeplex_requests_total", (("finish_reason", "error"), ("variant", "python")))] == 2
        assert engine_idle(url)


def engine_idle(url: str) -> bool:
    values = metrics(url)
    return values[("moeplex_num_requests_running", ())] == 0 and values[("moeplex_kv_cache_used_bytes", ())] == 0


def test_serve_flags_configure_offloading_and_threads(store, monkeypatch, capsys):
    from moeplex.cli import main

    started = []
    monkeypatch.setattr("moeplex.server.serve.serve", lambda store, host, port, settings, config: started.append(config))
    threads = torch.get_num_threads()
    try:
        flags = ["--dtype", "fp32", "--expert-budget-mib", "0.5", "--host-budget-mib", "2", "--offload-policy", "lru", "--no-prefetch", "--threads", "1",
                 "--host-execution", "always"]
        assert main(["serve", str(store), *flags]) == 0
    finally:
        torch.set_num_threads(threads)
    (config,) = started
    assert config.expert_budget_bytes == 2**19 and config.threads == 1
    offload = config.offload_config
    assert (offload.device_budget, offload.host_budget, offload.policy, offload.prefetch, offload.prediction) == (2**19, 2 * 2**20, "lru", False, "none")
    assert offload.host_execution == "always"
    assert main(["serve", str(store)]) == 0 and started[-1].offload_config is None and started[-1].threads == serving_threads()

    expert_mib = StoreReader(store).spec("base").expert_numel * 4 / 2**20
    assert main(["serve", str(store), "--dtype", "fp32", "--expert-budget-mib", "0.01"]) == 1
    assert f"--expert-budget-mib 0.01 cannot hold one expert ({expert_mib:.3f} MiB each in fp32)" in capsys.readouterr().err
    assert main(["serve", str(store), "--no-prefetch"]) == 1
    assert "only apply with --expert-budget-mib" in capsys.readouterr().err
    assert main(["serve", str(store), "--host-execution", "never"]) == 1
    assert "--host-execution only apply with --expert-budget-mib" in capsys.readouterr().err


def put_budget(url: str, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.put(f"{url}/admin/expert-budget", json=body, headers=headers, timeout=60)


def test_the_expert_budget_changes_live_under_load_and_no_request_fails(store):
    expert_mib = StoreReader(store).spec("base").expert_numel * 4 / 2**20
    requests = [(variant, stream) for stream in (False, True) for variant in PROMPTS] * 2
    llm = LLM(store, dtype=torch.float32, max_model_len=64, max_num_seqs=8)  # every expert resident: the reference
    with BackgroundServer(create_app(llm, ServerSettings(api_key=API_KEY))) as url:
        reference = {variant: complete(url, variant, max_tokens=10).json()["choices"][0]["text"] for variant in PROMPTS}
        assert_error(put_budget(url, {"mib": 1.0}), 409)["code"] == "offloading_off"

    with offloaded_server(store, budget_experts=3) as url:
        with ThreadPoolExecutor(len(requests)) as pool:
            replies = [pool.submit(complete, url, variant, 10, stream) for variant, stream in requests]
            changes = []
            for experts in (1, 40, 2, 5, 1, 12):  # shrink to one expert, grow past everything, ...
                changes.append(put_budget(url, {"mib": experts * expert_mib}))
            replies = [reply.result() for reply in replies]
        assert [c.status_code for c in changes] == [200] * len(changes), [c.text for c in changes]
        assert changes[-1].json()["expert_budget_mib"] == pytest.approx(12 * expert_mib, rel=1e-6)
        now = httpx.get(f"{url}/admin/expert-budget", headers={"Authorization": f"Bearer {API_KEY}"}).json()
        assert now["expert_budget_mib"] == changes[-1].json()["expert_budget_mib"] and 0 < now["resident_mib"] <= now["expert_budget_mib"]
        for (variant, stream), reply in zip(requests, replies):
            assert reply.status_code == 200, reply.text
            if stream:
                events = [line[len("data: "):] for line in reply.text.splitlines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                text = "".join(json.loads(event)["choices"][0]["text"] for event in events[:-1] if json.loads(event)["choices"])
            else:
                text = reply.json()["choices"][0]["text"]
            assert text == reference[variant], (variant, stream)
        values = metrics(url)
        assert values[("moeplex_expert_budget_bytes", ())] == pytest.approx(12 * expert_mib * 2**20, abs=1)
        assert values[("moeplex_failed_sequences_total", ())] == 0 and engine_idle(url)

        assert_error(put_budget(url, {"mib": expert_mib / 2}), 400, param="mib")  # below one expert
        assert_error(put_budget(url, {"mib": -1}), 400, param="mib")
        assert_error(put_budget(url, {"mib": 1.0}, key=None), 401)
        assert complete(url, "cpp", max_tokens=10).json()["choices"][0]["text"] == reference["cpp"]
