"""`moeplex bench multitenant`: seeded workloads, metric aggregation, the baseline servers over a real socket, and a smoke run."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import openai
import pytest

from moeplex.bench.multitenant.client import Sample
from moeplex.bench.multitenant.metrics import (
    describe,
    histogram_quantile,
    is_saturated,
    parse_queue_histogram,
    percentile,
    queue_time,
    summarize,
    turnaround_reduction,
)
from moeplex.bench.multitenant.workload import Trace, closed_loop_trace, poisson_trace
from tests.test_engine_store import build_serving_store, one_torch_thread  # noqa: F401 (autouse fixture)

PROMPTS = {"a": ["x", "y", "z"], "b": ["p", "q"]}


def test_traces_are_seeded_and_replay_from_their_file(tmp_path):
    trace = poisson_trace({"a": 1.5, "b": 0.5}, 60, PROMPTS, 25, seed=3)
    assert trace == poisson_trace({"a": 1.5, "b": 0.5}, 60, PROMPTS, 25, seed=3)
    assert trace != poisson_trace({"a": 1.5, "b": 0.5}, 60, PROMPTS, 25, seed=4)
    assert Trace.load(trace.save(tmp_path / "t.json")) == trace
    arrivals = [r.arrival for r in trace.requests]
    assert arrivals == sorted(arrivals) and 0 <= arrivals[0] and arrivals[-1] < 60
    assert all(r.prompt in PROMPTS[r.variant] and r.max_tokens == 25 for r in trace.requests)
    closed = closed_loop_trace(["a", "b"], 6, 3, PROMPTS, 25, seed=0, duration=10)
    assert [r.variant for r in closed.requests] == ["a", "b"] * 3 and closed.concurrency == 3 and Trace.load(closed.save(tmp_path / "c.json")) == closed


def test_poisson_arrivals_have_the_requested_rates():
    rates, duration = {"a": 2.0, "b": 0.25}, 4000.0
    trace = poisson_trace(rates, duration, PROMPTS, 25, seed=11)
    for variant, rate in rates.items():
        arrivals = [r.arrival for r in trace.requests if r.variant == variant]
        expected = rate * duration
        assert abs(len(arrivals) - expected) < 4 * math.sqrt(expected), (variant, len(arrivals), expected)
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.1)
        assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.15)  # exponential gaps: sd = mean


def test_percentiles_and_run_summary():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5 and percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    assert describe([1.0, 2.0, 3.0])["mean"] == 2.0 and math.isnan(describe([])["p99"])
    samples = [Sample("a", arrival=float(i), sent=float(i), first_token=i + 0.1, done=i + 1.1, output_tokens=11) for i in range(10)]
    samples.append(Sample("b", arrival=3.0, sent=3.0, error="HTTP 500"))
    run = summarize(samples)
    assert run["requests"] == 11 and run["errors"] == 1
    assert run["turnaround"]["p50"] == pytest.approx(1.1) and run["ttft"]["mean"] == pytest.approx(0.1)
    assert run["tpot"]["p90"] == pytest.approx(0.1)
    assert run["output_tokens"] == 110 and run["makespan"] == pytest.approx(10.1) and run["requests_per_second"] == pytest.approx(10 / 10.1)


def test_queue_time_from_prometheus_histograms():
    def text(count_a: int, count_b: int) -> str:
        return "\n".join([
            f'moeplex_request_queue_time_seconds_bucket{{le="0.1",variant="a"}} {count_a}',
            f'moeplex_request_queue_time_seconds_bucket{{le="1.0",variant="a"}} {2 * count_a}',
            f'moeplex_request_queue_time_seconds_bucket{{le="+Inf",variant="a"}} {2 * count_a}',
            f'moeplex_request_queue_time_seconds_count{{variant="a"}} {2 * count_a}',
            f'moeplex_request_queue_time_seconds_sum{{variant="a"}} {0.5 * count_a}',
            f'moeplex_request_queue_time_seconds_bucket{{le="+Inf",variant="b"}} {count_b}',
            'moeplex_request_queue_time_seconds_bucket{le="0.1",variant="b"} 0',
            f'moeplex_request_queue_time_seconds_bucket{{le="1.0",variant="b"}} {count_b}',
            f'moeplex_request_queue_time_seconds_count{{variant="b"}} {count_b}',
            f'moeplex_request_queue_time_seconds_sum{{variant="b"}} {0.5 * count_b}',
            "moeplex_time_to_first_token_seconds_count 99",
        ])
    before, after = parse_queue_histogram(text(1, 0)), parse_queue_histogram(text(3, 4))
    assert after["count"] == 10 and after["le=0.1"] == 3 and after["le=inf"] == 10
    stats = queue_time(before, after)  # 2 new requests <= 0.1 s, 6 in (0.1, 1]
    assert stats["mean"] == pytest.approx((0.5 * 2 + 0.5 * 4) / 8)
    assert stats["p50"] == pytest.approx(0.1 + 0.9 * (4 - 2) / 6)
    assert histogram_quantile([(0.1, 2.0), (1.0, 8.0), (math.inf, 8.0)], 1.0) == pytest.approx(1.0)
    assert math.isnan(queue_time({}, {})["mean"])


def open_loop_run(turnarounds: list[float], gap: float = 0.5) -> dict:
    """summarize() of requests arriving every `gap` s with the given turnarounds."""
    return summarize([Sample("a", i * gap, i * gap, i * gap + 0.01, i * gap + t, 25) for i, t in enumerate(turnarounds)])


def test_saturation_is_a_growing_queue_not_a_slower_level():
    level = open_loop_run([1.0, 1.2, 0.9, 1.1, 1.0, 1.2, 0.9, 1.1, 1.0])  # 4.5 s of arrivals, served as they come
    assert level["turnaround_growth"] == pytest.approx(1.0, rel=0.1) and not is_saturated(level, duration=4.5)
    growing = open_loop_run([0.5 + 0.3 * i for i in range(9)])  # each request waits 0.3 s longer than the one before
    assert growing["turnaround_growth"] > 2 and is_saturated(growing, duration=4.5)
    late = open_loop_run([1.0] * 8 + [2.0])  # level, but the last request ends 1.5 s after the last arrival: served < 0.9 x arrived
    assert late["makespan"] == pytest.approx(6.0) and is_saturated(late, duration=5.0) and not is_saturated(late, duration=5.5)
    assert is_saturated(level | {"errors": 1}, duration=4.5)


def test_the_headline_reduction():
    assert turnaround_reduction(1.5, 10.0) == pytest.approx(0.85) and turnaround_reduction(2.0, 1.0) == -1.0


@pytest.fixture(scope="module")
def served_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitenant")
    store = build_serving_store(root)
    checkpoints = {"python": root / "python", "cpp": root / "cpp"}
    for folder in checkpoints.values():  # each variant carries the tokenizer, as the demo's do (per-variant stores copy it)
        for file in (root / "base").glob("*token*"):
            shutil.copy(file, folder / file.name)
    return store, checkpoints


@pytest.mark.parametrize("module", ["swap_server", "hf_server"])
def test_baseline_servers_answer_the_openai_client(served_family, module):
    import importlib

    from moeplex.bench.multitenant.openai_app import create_baseline_app
    from moeplex.server import BackgroundServer
    from moeplex.store.layout import TOKENIZER

    store, checkpoints = served_family
    backend_class = {"swap_server": "SwappingBackend", "hf_server": "TransformersBackend"}[module]
    backend = getattr(importlib.import_module(f"moeplex.bench.multitenant.{module}"), backend_class)(checkpoints, store / TOKENIZER, "fp32")
    with BackgroundServer(create_baseline_app(backend)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="python", prompt="def f(x):", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length" and reply.choices[0].text
        chunks = list(client.completions.create(model="cpp", prompt=[5, 6, 7], max_tokens=5, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        assert chunks[-1].usage.completion_tokens == 5 and chunks[-2].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        assert [m.id for m in client.models.list()] == ["python", "cpp"]
    if module == "swap_server":
        assert backend.swaps == 2  # python, then cpp


@pytest.mark.slow
def test_the_command_writes_the_report_and_the_headline_json(served_family, tmp_path):
    from moeplex.cli import main

    store, _ = served_family
    out, summary = tmp_path / "report", tmp_path / "multitenant.json"
    assert main(["bench", "multitenant", "--store", str(store), "--out", str(out), "--json", str(summary), "--variants", "2",
                 "--duration", "2", "--drain", "5", "--load-factors", "0.5", "1", "--requests", "8", "--output-tokens", "4",
                 "--threads", "1", "--dtype", "fp32"]) == 0
    result = json.loads(summary.read_text())
    claims = result["by_variants"]["2"]
    for key in ("turnaround_reduction_vs_static", "throughput_ratio_vs_single", "ttft_p50_ratio_vs_single"):
        assert math.isfinite(claims[key])
    systems = result["comparisons"]["2"]["systems"]
    assert set(systems) == {"moeplex", "static", "single", "swapping", "transformers"}
    assert all(run["peak_rss_bytes"] > 0 and run["closed_loop"]["output_tokens"] > 0 for run in systems.values())
    samples = json.loads((out / "samples-2.json").read_text())
    assert samples["static"]["sweep"][0]["samples"] and (out / "latency-2.png").stat().st_size > 0
    assert "| moeplex |" in (out / "report.md").read_text()
    assert (out / "variants-2" / "traces" / "poisson-0.json").is_file()
