"""`moeplex bench serve` end to end on a tiny store with small settings: every reported number is there and sane."""

from __future__ import annotations

from moeplex.bench.serve import format_table, paired_order, paired_ratio, run_serve_benchmark
from moeplex.bench.serve_options import ServeBenchSettings
from tests.test_engine_store import build_serving_store, one_torch_thread  # noqa: F401 (autouse fixture)


def test_bench_serve_reports_ratios_and_switch_cost(tmp_path):
    store = build_serving_store(tmp_path)
    settings = ServeBenchSettings(
        num_variants=3, concurrency=3, closed_loop_requests=6, open_loop_requests=4, prompt_tokens=8, output_tokens=4,
        repeats=3, threads=1, dtype="fp32", engine_step_arrivals=8,
    )
    result = run_serve_benchmark(store, settings)
    assert result["throughput_ratio_multi_vs_single"] > 0 and result["ttft_p50_ratio_multi_vs_single"] > 0
    for system in ("multi", "single"):
        assert result[system]["runs"]["closed_loop"][0]["output_tokens"] == 6 * 4
    one = result["one_backbone"]
    assert one["switches"] > 0 and one["load_seconds"] > 0 and 0 <= one["hidden_fraction"] <= 1
    runs = {system: result[system]["runs"]["closed_loop"] for system in ("multi", "single")}
    pair_ratios = sorted(m["tokens_per_second"] / s["tokens_per_second"] for m, s in zip(runs["multi"], runs["single"]))
    assert result["throughput_ratio_multi_vs_single"] == pair_ratios[len(pair_ratios) // 2]  # median of the pairs
    steps = result["engine_step_ratio_multi_vs_single"]
    assert steps["with_prefill"] > 0 and steps["decode_only"] > 0 and steps["steps"] == 6 * 8
    assert "throughput ratio" in format_table(result) and "engine alone" in format_table(result)


def test_pairs_alternate_their_order_and_ratios_are_the_median_of_the_pairs():
    assert [paired_order(["multi", "single"], repeat) for repeat in range(3)] == [
        ["multi", "single"], ["single", "multi"], ["multi", "single"]]
    # the machine slows down 2x after the first pair; the ratio of the medians (4.6 / 5.0) would differ
    multi = [{"x": 9.0}, {"x": 4.0}, {"x": 4.6}]
    single = [{"x": 10.0}, {"x": 5.0}, {"x": 5.0}]
    assert paired_ratio(multi, single, "x") == 0.9
