"""`moeplex bench serve` end to end on a tiny store with small settings: every reported number is there and sane."""

from __future__ import annotations

from moeplex.bench.serve import format_table, run_serve_benchmark
from moeplex.bench.serve_options import ServeBenchSettings
from tests.test_engine_store import build_serving_store, one_torch_thread  # noqa: F401 (autouse fixture)


def test_bench_serve_reports_ratios_and_switch_cost(tmp_path):
    store = build_serving_store(tmp_path)
    settings = ServeBenchSettings(
        num_variants=3, concurrency=3, closed_loop_requests=6, open_loop_requests=4, prompt_tokens=8, output_tokens=4,
        repeats=1, threads=1, dtype="fp32",
    )
    result = run_serve_benchmark(store, settings)
    assert result["throughput_ratio_multi_vs_single"] > 0 and result["ttft_p50_ratio_multi_vs_single"] > 0
    for system in ("multi", "single"):
        assert result[system]["runs"]["closed_loop"][0]["output_tokens"] == 6 * 4
    one = result["one_backbone"]
    assert one["switches"] > 0 and one["load_seconds"] > 0 and 0 <= one["hidden_fraction"] <= 1
    assert "throughput ratio multi/single" in format_table(result)
