"""The compared systems as server processes behind one OpenAI API: moeplex, static partitions, one model, whole-model swapping, transformers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from moeplex.bench.multitenant.metrics import gauge_total, parse_queue_histogram
from moeplex.bench.multitenant.options import SYSTEM_NAMES
from moeplex.bench.multitenant.processes import ServerProcess
from moeplex.bench.multitenant.stores import MIB
from moeplex.store.layout import TOKENIZER


@dataclass(frozen=True)
class ServeOptions:
    """What every `moeplex serve` process of the benchmark is given besides its store, budget and threads."""

    dtype: str = "bf16"
    max_num_seqs: int = 16
    max_model_len: int = 256
    offload_policy: str = "trace"
    prefetch: bool = True


@dataclass
class System:
    """One compared system: its server processes, and which process and model name serve each variant."""

    name: str
    servers: list[ServerProcess]
    routes: dict[str, tuple[int, str]]  # variant -> (index into servers, model name it is requested as)

    def route(self, variant: str) -> tuple[str, str]:
        index, model = self.routes[variant]
        return self.servers[index].url, model

    def start(self) -> None:
        for server in self.servers:
            server.start()

    def wait_ready(self) -> None:
        for server in self.servers:
            server.wait_ready()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until no server runs or queues a request (work left by cancelled requests must not overlap the next run)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            texts = [server.metrics_text() for server in self.servers]
            if all(gauge_total(t, "moeplex_num_requests_running") + gauge_total(t, "moeplex_num_requests_waiting") == 0 for t in texts):
                return
            time.sleep(0.2)

    def peak_rss(self) -> int:
        return sum(server.peak_rss() for server in self.servers)

    def queue_histogram(self) -> dict[str, float]:
        """The servers' queue-time histograms, summed."""
        total: dict[str, float] = {}
        for server in self.servers:
            for key, value in parse_queue_histogram(server.metrics_text()).items():
                total[key] = total.get(key, 0.0) + value
        return total


def moeplex_server(name: str, store: Path, budget_bytes: int | None, threads: int, options: ServeOptions, log: Path) -> ServerProcess:
    """`moeplex serve STORE` with the device expert budget (None: every expert resident), threads and offloading options."""
    args = ["moeplex.cli", "serve", str(store), "--dtype", options.dtype, "--max-num-seqs", str(options.max_num_seqs),
            "--max-model-len", str(options.max_model_len), "--max-pending", "4096", "--threads", str(threads)]
    if budget_bytes is not None:
        args += ["--expert-budget-mib", f"{budget_bytes / MIB:.4f}", "--offload-policy", options.offload_policy]
        if not options.prefetch:
            args.append("--no-prefetch")
    return ServerProcess(name, args, threads, log)


def baseline_server(name: str, module: str, checkpoints: dict[str, Path], tokenizer: Path, threads: int, dtype: str, log: Path) -> ServerProcess:
    args = [f"moeplex.bench.multitenant.{module}", "--tokenizer", str(tokenizer), "--threads", str(threads), "--dtype", dtype]
    for variant, folder in checkpoints.items():
        args += ["--model", f"{variant}={folder}"]
    return ServerProcess(name, args, threads, log)


def build_systems(
    names: tuple[str, ...], store: Path, single_stores: dict[str, Path], checkpoints: dict[str, Path], budget_bytes: int,
    threads: int, options: ServeOptions, logs: Path,
) -> list[System]:
    """The named systems for these variants (the keys of checkpoints), at one total expert budget and thread count."""
    variants = list(checkpoints)
    count = len(variants)
    systems = []
    for name in names:
        if name == "moeplex":
            servers = [moeplex_server(name, store, budget_bytes, threads, options, logs / "moeplex.log")]
            routes = {v: (0, v) for v in variants}
        elif name == "static":
            share = max(1, threads // count)
            servers = [moeplex_server(name, single_stores[v], budget_bytes // count, share, options, logs / f"static-{v}.log") for v in variants]
            routes = {v: (i, v) for i, v in enumerate(variants)}
        elif name == "single":
            servers = [moeplex_server(name, single_stores[variants[0]], budget_bytes, threads, options, logs / "single.log")]
            routes = {v: (0, variants[0]) for v in variants}
        elif name == "swapping":
            servers = [baseline_server(name, "swap_server", checkpoints, store / TOKENIZER, threads, options.dtype, logs / "swapping.log")]
            routes = {v: (0, v) for v in variants}
        elif name == "transformers":
            servers = [baseline_server(name, "hf_server", checkpoints, store / TOKENIZER, threads, options.dtype, logs / "transformers.log")]
            routes = {v: (0, v) for v in variants}
        else:
            raise ValueError(f"unknown system '{name}'; expected one of {', '.join(SYSTEM_NAMES)}")
        systems.append(System(name, servers, routes))
    return systems
