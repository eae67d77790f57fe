"""Where one offloaded decode request spends its time: `python -m moeplex.bench.offload_profile`.

On the bench store of `moeplex bench offload`, at one budget: LRU, moeplex, moeplex without the
revision after each layer, and resident, timed side by side (median decode tokens/s), then a cProfile
of one request of LRU and of moeplex listing the offloading functions by cumulative time. A diagnostic
for docs/offloading.md, not a benchmark with targets.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from moeplex.bench.measure import median
from moeplex.bench.offload import BenchSetup, decode_tokens_per_s, drop_page_cache, pool_summary, random_prompts, reset_counters
from moeplex.demo.stores import bench_base_store
from moeplex.offload.bench_options import OffloadBenchSettings

PROFILED = "offload|prediction|forecast|reuse|policies|disk"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25, help="device budget as a fraction of the expert bytes (default: 0.25)")
    parser.add_argument("--repeats", type=int, default=5, help="measured requests per system (default: 5)")
    parser.add_argument("--lines", type=int, default=30, help="profile lines per system (default: 30)")
    args = parser.parse_args(argv)
    settings = OffloadBenchSettings(repeats=args.repeats)
    torch.set_num_threads(settings.threads)
    store = bench_base_store()
    setup = BenchSetup.open(store)
    count = settings.calibration_requests
    prompts = random_prompts(count + args.repeats + 2, settings.prompt_tokens, setup.spec.vocab_size, settings.seed)
    drop_page_cache(store)
    setup.seed_library(prompts[:count], settings)
    budget = int(args.budget * setup.expert_bytes)
    models = {name: setup.offloaded(name, budget, settings) for name in ("lru", "moeplex")}
    models["moeplex, no revision"] = setup.offloaded("moeplex", budget, settings)
    models["moeplex, no revision"].experts.after_layer = lambda layer, residual: None
    models["resident"] = setup.resident
    for model in models.values():
        decode_tokens_per_s(model, prompts[count], settings.new_tokens)
        reset_counters(model)
    samples: dict[str, list[float]] = {name: [] for name in models}
    measured = prompts[count + 1 : count + 1 + args.repeats]
    for prompt in measured:
        for name, model in models.items():
            samples[name].append(decode_tokens_per_s(model, prompt, settings.new_tokens))
    print(f"budget {args.budget:.0%}, median of {args.repeats} requests of {settings.new_tokens} tokens")
    for name, values in samples.items():
        line = f"{name:>22}: {median(values):6.2f} tok/s"
        if name != "resident":
            pool = pool_summary(models[name].experts.pool.stats, len(measured) * settings.new_tokens)
            line += f", hit rate {pool['hit_rate']:.1%}, wait {pool['wait_seconds_per_token'] * 1e3:.1f} ms/token"
        print(line)
    for name in ("lru", "moeplex"):
        profile = cProfile.Profile()
        profile.enable()
        decode_tokens_per_s(models[name], prompts[-1], settings.new_tokens)
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(PROFILED, args.lines)
        print(f"--- {name}: one request\n{text.getvalue()}")
    for name, model in models.items():
        if name != "resident":
            model.experts.close()


if __name__ == "__main__":
    main()
