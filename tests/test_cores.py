"""Thread counts from the cores a process may use: the engine behind the HTTP server leaves one core to it, and
background threads run their ops on one OpenMP thread without changing anyone else's."""

from __future__ import annotations

import threading

import pytest
import torch

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


def test_one_omp_thread_holds_for_the_calling_thread_only():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}

        def background():
            seen["before"] = torch.get_num_threads()
            cores.one_omp_thread_for_this_thread()
            torch.randn(512, 512) @ torch.randn(512, 512)  # a parallel op does not reset it
            seen["after"] = torch.get_num_threads()

        thread = threading.Thread(target=background)
        thread.start()
        thread.join(10)
        assert seen == {"before": 2, "after": 1}
        assert torch.get_num_threads() == 2  # the caller's threads are untouched
    finally:
        torch.set_num_threads(previous)
