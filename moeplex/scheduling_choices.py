"""Names of the engine's scheduling choices (policies, prefill modes), importable without torch for CLI parsers."""

from __future__ import annotations

POLICIES = ("fcfs", "variant-fair")
PREFILL_MODES = ("separate", "mixed")  # prompts in steps of their own, or joining the decode steps
