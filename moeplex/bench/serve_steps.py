"""Engine step cost of 4 variants against 1, without HTTP or queueing: the structural part of `moeplex bench serve`'s ratios."""

from __future__ import annotations

import random
import time
from pathlib import Path

from moeplex.bench.measure import median
from moeplex.engine import Engine, EngineConfig
from moeplex.model.sampling import SamplingParams


def engine_step_ratios(store: Path, config: EngineConfig, num_variants: int, prompt_tokens: int, output_tokens: int, arrivals: int = 120, seed: int = 0) -> dict:
    """Median paired step-time ratio, an engine serving num_variants variants over one serving the first, fed the same prompts.

    Both engines get a new request every 8 steps (so about output_tokens / 8 sequences run) and step in
    turn, one step each, so the machine's drift touches both alike. Returns the median ratio of the
    steps that hold a prefill and of the decode-only steps, after the first quarter of the arrivals.
    """
    multi, single = Engine(store, config), Engine(store, config)
    try:
        variants = multi.variants[:num_variants]
        rng = random.Random(seed)
        params = SamplingParams(max_tokens=output_tokens, temperature=0, ignore_eos=True)
        decode_steps = 8
        prefill, decode = [], []
        for arrival in range(arrivals):
            prompt = [rng.randrange(multi.spec.vocab_size) for _ in range(prompt_tokens)]
            multi.add_request(variants[arrival % len(variants)], prompt, params)
            single.add_request(variants[0], prompt, params)
            for step in range(decode_steps):
                pair = (timed_step(multi), timed_step(single))
                if arrival >= arrivals // 4:  # after warm-up, once as many sequences finish as start
                    (prefill if step == 0 else decode).append(pair[0] / pair[1])
        return {"with_prefill": median(prefill), "decode_only": median(decode), "steps": len(prefill) + len(decode)}
    finally:
        multi.close()
        single.close()


def timed_step(engine: Engine) -> float:
    started = time.perf_counter()
    engine.step()
    return time.perf_counter() - started
