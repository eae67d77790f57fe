"""Build and load moeplex's C kernels: compiled with the system compiler on first use, cached under $MOEPLEX_CACHE/native.

Each shared object is keyed by its source, the shared headers (native_include/), flags and the
compiler's version, and compiled into a scratch folder, then moved into place, so concurrent first
uses never load a half-written file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

INCLUDE_DIR = Path(__file__).with_name("native_include")  # headers every kernel may include


def load_kernel(source: Path, flags: tuple[str, ...], supported: str, what: str, fallback: str) -> ctypes.CDLL | None:
    """The loaded library of source, or None where it cannot run: not x86-64 Linux, not built (warned), or
    its `supported` function returns 0 on this CPU. what and fallback word the warning."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return None
    try:
        library = ctypes.CDLL(str(built_library(source, flags)))
    except (OSError, subprocess.CalledProcessError, FileNotFoundError) as error:
        warnings.warn(f"moeplex's {what} could not be built ({error}); {fallback}", stacklevel=3)
        return None
    return library if getattr(library, supported)() else None


def built_library(source: Path, flags: tuple[str, ...] = ()) -> Path:
    """The cached shared object of source (compiled with -O3, the shared headers and flags if missing); raises if it cannot be built."""
    from moeplex.demo.build import cache_dir

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    headers = b"".join(header.read_bytes() for header in sorted(INCLUDE_DIR.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, "-O3", "-shared", "-fPIC", f"-I{INCLUDE_DIR}", *flags, str(source), "-o", str(built)],
                       capture_output=True, text=True, check=True)
        os.replace(built, target)
    return target
