"""The x86 CPU's feature flags, from /proc/cpuinfo: which matmul path is the faster one depends on them."""

from __future__ import annotations

import functools
import platform


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's flags on x86-64 Linux; empty elsewhere (another architecture, or no /proc/cpuinfo)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def has_amx_bf16() -> bool:
    """Whether the CPU has AMX tiles for bf16 (Intel Sapphire Rapids and later; not AMD Zen 4, which has AVX512-BF16 only)."""
    return "amx_bf16" in cpu_flags()
