"""Thread counts from the cores a process may use: the engine behind the HTTP server leaves one core to it."""

from __future__ import annotations

import pytest

from moeplex import cores
from moeplex.bench.serve_options import ServeBenchSettings


@pytest.mark.parametrize(("allowed", "expected"), [(1, 1), (2, 1), (3, 2), (16, 15)])
def test_serving_threads_leave_one_core_to_the_server(monkeypatch, allowed, expected):
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda pid: set(range(allowed)), raising=False)
    assert cores.available_cores() == allowed
    assert cores.serving_threads() == expected
    assert ServeBenchSettings().threads == expected  # the benchmark serves as `moeplex serve` does


def test_available_cores_without_affinity(monkeypatch):
    monkeypatch.delattr(cores.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 6)
    assert cores.available_cores() == 6 and cores.serving_threads() == 5
    monkeypatch.setattr(cores.os, "cpu_count", lambda: None)
    assert cores.available_cores() == 1 and cores.serving_threads() == 1
