"""Scheduling policies as pure objects: the order in which waiting sequences are admitted, and whom to preempt.

A policy sees sequences and the tokens served per variant so far and returns a decision; it holds no
state and touches no model, so it is tested on its own and the same object drives any engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from moeplex.engine.sequence import Sequence


class SchedulingPolicy(Protocol):
    name: str

    def admission_order(self, waiting: list[Sequence], served_tokens: Mapping[str, int]) -> list[Sequence]:
        """Every waiting sequence, the one to admit first first."""
        ...

    def preemption_victim(self, candidates: list[Sequence], served_tokens: Mapping[str, int]) -> Sequence:
        """The running sequence (of the non-empty candidates) to give up its KV cache."""
        ...


def _arrival_key(seq: Sequence) -> tuple[float, int]:
    return (seq.times.arrival, seq.seq_id)


class FCFSPolicy:
    """First come, first served, as the published system: oldest first; the newest is preempted first."""

    name = "fcfs"

    def admission_order(self, waiting, served_tokens):
        return sorted(waiting, key=_arrival_key)

    def preemption_victim(self, candidates, served_tokens):
        return max(candidates, key=_arrival_key)


class VariantFairPolicy:
    """Variants take turns: the variant served the fewest tokens goes first, then round-robin across variants.

    Within a variant, oldest first. The victim is the newest sequence of the most-served variant.
    """

    name = "variant-fair"

    def admission_order(self, waiting, served_tokens):
        queues: dict[str, list[Sequence]] = {}
        for seq in sorted(waiting, key=_arrival_key):
            queues.setdefault(seq.variant, []).append(seq)
        variants = sorted(queues, key=lambda v: (served_tokens.get(v, 0), _arrival_key(queues[v][0])))
        order = []
        for turn in range(max((len(q) for q in queues.values()), default=0)):
            order += [queues[v][turn] for v in variants if turn < len(queues[v])]
        return order

    def preemption_victim(self, candidates, served_tokens):
        return max(candidates, key=lambda s: (served_tokens.get(s.variant, 0), _arrival_key(s)))


def policy_by_name(name: str) -> SchedulingPolicy:
    policies = {policy.name: policy for policy in (FCFSPolicy(), VariantFairPolicy())}
    if name not in policies:
        raise ValueError(f"unknown scheduling policy '{name}' (known: {', '.join(policies)})")
    return policies[name]
