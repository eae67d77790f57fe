"""Where decoding spends its time: torch.profiler over moeplex's decode steps, grouped by operator and shapes."""

from __future__ import annotations

import torch

from moeplex.model.generate import generate
from moeplex.model.runtime import MoEModel
from moeplex.model.sampling import SamplingParams


def profile_decode(model: MoEModel, prompts: list[list[int]], new_tokens: int, rows: int = 12) -> list[dict]:
    """The operators (with input shapes) that take the most self CPU time while generating new_tokens.

    Each row: op, input shapes, calls, self milliseconds and share of the total self time.
    """
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    generate(model, prompts, params)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profiler:
        generate(model, prompts, params)
    events = profiler.key_averages(group_by_input_shape=True)
    total = sum(event.self_cpu_time_total for event in events)
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:rows]
    return [
        {
            "op": event.key,
            "shapes": str(event.input_shapes),
            "calls": event.count,
            "self_ms": event.self_cpu_time_total / 1e3,
            "share": event.self_cpu_time_total / total,
        }
        for event in top
    ]


def format_profile(rows: list[dict]) -> str:
    lines = [f"{'share':>6} {'self ms':>9} {'calls':>6}  op  input shapes"]
    lines += [f"{r['share']:>6.1%} {r['self_ms']:>9.1f} {r['calls']:>6}  {r['op']}  {r['shapes']}" for r in rows]
    return "\n".join(lines)
