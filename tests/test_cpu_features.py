"""CPU feature flags from /proc/cpuinfo, which choose matmul paths."""

from __future__ import annotations

import builtins
import io

from moeplex import cpu_features

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\nbogomips\t: 4800\n"


def read_flags(monkeypatch, machine: str, cpuinfo: str | None) -> frozenset[str]:
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)

    def fake_open(path, *args, **kwargs):
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return io.StringIO(cpuinfo)

    monkeypatch.setattr(builtins, "open", fake_open)
    return cpu_features.cpu_flags.__wrapped__()


def test_flags_are_read_from_the_first_flags_line(monkeypatch):
    assert read_flags(monkeypatch, "x86_64", CPUINFO) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}


def test_no_flags_off_x86_or_without_cpuinfo(monkeypatch):
    assert read_flags(monkeypatch, "aarch64", CPUINFO) == frozenset()
    assert read_flags(monkeypatch, "x86_64", None) == frozenset()
    assert read_flags(monkeypatch, "x86_64", "processor\t: 0\n") == frozenset()


def test_amx_is_its_own_flag(monkeypatch):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert not cpu_features.has_amx_bf16()
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16", "amx_tile"}))
    assert cpu_features.has_amx_bf16()
