"""A process-wide switch for an optional fast path: off by environment variable, or for a block (benchmarks compare both)."""

from __future__ import annotations

import contextlib
import os


class Switch:
    """On unless `variable` was "0" in the environment when it was made, or a `turned_off()` block is running."""

    def __init__(self, variable: str):
        self.variable = variable
        self._off_by_environment = os.environ.get(variable, "1") == "0"  # read once: checked on every matmul
        self._off_in_block = False

    @property
    def on(self) -> bool:
        return not (self._off_by_environment or self._off_in_block)

    @contextlib.contextmanager
    def turned_off(self):
        previous, self._off_in_block = self._off_in_block, True
        try:
            yield
        finally:
            self._off_in_block = previous
