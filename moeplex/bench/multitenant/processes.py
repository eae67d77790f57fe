"""Server processes of a benchmarked system: started on free ports, waited for, measured (peak resident memory), stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def stop_servers_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit, so that the `finally` blocks stopping the benchmark's servers run (no orphans)."""

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set (VmHWM) of a process and its descendants, from /proc; 0 where unreadable."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += peak_rss_bytes(int(child))
    except (OSError, ValueError):
        pass
    return total


@dataclass
class ServerProcess:
    """One HTTP server subprocess: `python -m MODULE ARGS --port P`, its output in a log file."""

    name: str
    args: list[str]  # after `python -m`, without the port
    threads: int
    log: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        # Passive OpenMP waiting: on a shared machine, threads spinning at barriers in one process stall the others.
        env = os.environ | {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads), "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", *self.args, "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.process.returncode}; see {self.log}:\n{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} not ready after {timeout:.0f} s; see {self.log}")

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def peak_rss(self) -> int:
        return peak_rss_bytes(self.process.pid) if self.process is not None else 0

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
