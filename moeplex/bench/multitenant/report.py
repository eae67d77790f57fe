"""The report of `moeplex bench multitenant`: raw samples as JSON, a Markdown table, PNG plots of latency against arrival rate."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {  # the published claims: (key, target, comparison)
    "turnaround_reduction_vs_static": (0.85, ">="),
    "throughput_ratio_vs_single": (0.9, ">="),
    "ttft_p50_ratio_vs_single": (1.1, "<="),
}


def target_lines(result: dict) -> list[str]:
    lines = []
    for count, claims in result["by_variants"].items():
        for key, (target, comparison) in TARGETS.items():
            if key not in claims:
                continue
            value = claims[key]
            met = value >= target if comparison == ">=" else value <= target
            lines.append(f"{count} variants: {key} = {value:.3f} (target {comparison} {target}: {'met' if met else f'MISSED by {abs(value - target):.3f}'})")
        if "static_saturation_rate" in claims:
            lines.append(f"  at {claims['static_saturation_rate']:.2f} req/s, where static partitioning "
                         f"{'saturates' if claims['static_saturated_in_sweep'] else 'was still unsaturated (highest swept rate)'}: "
                         f"mean turnaround moeplex {claims['moeplex_turnaround_mean']:.3f} s, static {claims['static_turnaround_mean']:.3f} s")
        if "ttft_rate" in claims:
            lines.append(f"  TTFT compared at {claims['ttft_rate']:.2f} req/s ({'below' if claims['ttft_rate_below_every_saturation'] else 'NOT below'} the saturation of moeplex, static and single)")
    return lines


def number(value: float | None, form: str) -> str:
    return "-" if value is None or value != value else form.format(value)


def ms(seconds: float | None) -> str:
    return number(None if seconds is None else 1000 * seconds, "{:.0f}")


def system_table(comparison: dict, claims: dict) -> list[str]:
    """One row per system: capacity, saturation, latency at the headline rates, memory."""
    systems = comparison["systems"]
    single = systems.get("single", {}).get("closed_loop", {}).get("tokens_per_second")
    at = claims.get("static_saturation_rate")
    rows = [
        "| system | processes | closed-loop tokens/s | x one model | saturates at req/s | mean turnaround s at static's saturation | "
        "TTFT p50 ms (lowest rate) | TPOT p50 ms | queue mean ms | errors | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in systems.items():
        tokens = run["closed_loop"]["tokens_per_second"]
        at_point = next((p["summary"] for p in run["sweep"] if p["rate"] == at), None)
        low = run["sweep"][0]["summary"] if run["sweep"] else None
        errors = run["closed_loop"]["errors"] + sum(p["summary"]["errors"] for p in run["sweep"])
        cells = [
            name, str(run["processes"]), f"{tokens:.1f}", number(tokens / single if single else None, "{:.2f}"),
            number(run["saturation_rate"], "{:.2f}"), number(at_point and at_point["turnaround"]["mean"], "{:.2f}"),
            ms(low and low["ttft"]["p50"]), ms(low and low["tpot"]["p50"]), ms(low and low["queue"]["mean"]), str(errors),
            f"{run['peak_rss_bytes'] / 2**20:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def sweep_table(comparison: dict) -> list[str]:
    rows = ["| req/s | system | turnaround mean / p50 / p90 / p99 s | TTFT mean / p50 / p90 / p99 ms | TPOT p50 ms | queue mean / p90 ms | done req/s | errors |",
            "|---|---|---|---|---|---|---|---|"]
    points = sorted(((p["rate"], name, p["summary"]) for name, run in comparison["systems"].items() for p in run["sweep"]), key=lambda x: x[0])
    for rate, name, s in points:
        t, f, q = s["turnaround"], s["ttft"], s["queue"]
        rows.append(f"| {rate:.2f} | {name} | {t['mean']:.2f} / {t['p50']:.2f} / {t['p90']:.2f} / {t['p99']:.2f} | "
                    f"{ms(f['mean'])} / {ms(f['p50'])} / {ms(f['p90'])} / {ms(f['p99'])} | {ms(s['tpot']['p50'])} | {ms(q['mean'])} / {ms(q['p90'])} | "
                    f"{s['requests_per_second']:.2f} | {s['errors']}/{s['requests']} |")
    return rows


def format_markdown(result: dict) -> str:
    budget = result["budget"]
    lines = [f"Store `{result['store']}`; total expert budget {budget['total_expert_bytes'] / 2**20:.2f} MiB; "
             f"one variant's experts {max(budget['one_variant_expert_bytes'].values()) / 2**20:.2f} MiB; elapsed {result['elapsed_seconds']:.0f} s.", ""]
    for count, comparison in result["comparisons"].items():
        claims = result["by_variants"][count]
        lines += [f"### {count} variants ({', '.join(comparison['variants'])})", "",
                  f"Rates are multiples of {comparison['capacity_reference']}'s closed-loop capacity, {comparison['capacity_requests_per_second']:.2f} requests/s.", ""]
        lines += system_table(comparison, claims) + [""] + sweep_table(comparison) + [""]
    lines += ["Targets:", ""] + [f"- {line.strip()}" for line in target_lines(result)]
    return "\n".join(lines) + "\n"


def format_summary(result: dict) -> str:
    """The short table printed at the end of the run."""
    lines = []
    for count, comparison in result["comparisons"].items():
        lines.append(f"{count} variants: {'system':<13}{'tokens/s':>10}{'saturates at':>14}{'TTFT p50 ms':>13}{'peak RSS MiB':>14}")
        for name, run in comparison["systems"].items():
            low = run["sweep"][0]["summary"]["ttft"]["p50"] if run["sweep"] else None
            saturation = "-" if run["saturation_rate"] is None else f"{run['saturation_rate']:.2f}"
            lines.append(f"{'':<12}{name:<13}{run['closed_loop']['tokens_per_second']:>10.1f}{saturation:>14}{ms(low):>13}{run['peak_rss_bytes'] / 2**20:>14.0f}")
    return "\n".join(lines + target_lines(result) + [f"report in {result['out']} ({result['elapsed_seconds']:.0f} s)"])


def plot_latency(comparison: dict, claims: dict, path: Path) -> None:
    """Mean turnaround and TTFT p50 against total arrival rate, one line per system; saturated points crossed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in comparison["systems"].items():
        rates = [p["rate"] for p in run["sweep"]]
        for axis, key, stat in ((axes[0], "turnaround", "mean"), (axes[1], "ttft", "p50")):
            line, = axis.plot(rates, [p["summary"][key][stat] for p in run["sweep"]], marker="o", label=name)
            if run["saturation_rate"] is not None:
                point = next(p for p in run["sweep"] if p["rate"] == run["saturation_rate"])
                axis.plot([point["rate"]], [point["summary"][key][stat]], marker="x", markersize=12, color=line.get_color())
    for axis, title in ((axes[0], "mean turnaround (s)"), (axes[1], "TTFT p50 (s)")):
        if claims.get("static_saturation_rate"):
            axis.axvline(claims["static_saturation_rate"], linestyle="--", color="grey", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("total arrival rate (requests/s)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    figure.suptitle(f"{len(comparison['variants'])} variants: latency against arrival rate (x: saturated; dashed: static saturates)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(out: Path, result: dict, raw: dict[str, dict]) -> None:
    """samples-N.json (every request's timeline), report.md, latency-N.png, summary.json under out."""
    out.mkdir(parents=True, exist_ok=True)
    for count, samples in raw.items():
        (out / f"samples-{count}.json").write_text(json.dumps(samples) + "\n")
        plot_latency(result["comparisons"][count], result["by_variants"][count], out / f"latency-{count}.png")
    (out / "report.md").write_text(format_markdown(result))
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
