"""Seed the trace library: run calibration prompts through an offloaded model, one traced request each."""

from __future__ import annotations

from moeplex.model.generate import generate
from moeplex.model.runtime import MoEModel
from moeplex.model.sampling import SamplingParams
from moeplex.offload.offloaded import OffloadedExperts


def calibrate(model: MoEModel, prompts: list[list[int]], new_tokens: int, variant: str) -> int:
    """Greedy-decode each prompt as its own request; returns the traces the library now holds."""
    experts: OffloadedExperts = model.experts
    if experts.forecaster is None:
        raise ValueError("calibration needs an offloaded model with prediction on (it records traces)")
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for prompt in prompts:
        with experts.request(variant):
            generate(model, [prompt], params)
    return len(experts.forecaster.tracer.library)
