"""Build moeplex's C kernels with the system compiler on first use, cached under $MOEPLEX_CACHE/native.

Each shared object is keyed by its source and the compiler's version, and compiled into a scratch
folder, then moved into place, so concurrent first uses never load a half-written file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def built_library(source: Path, flags: tuple[str, ...] = ()) -> Path:
    """The cached shared object of source (compiled with -O3 and flags if missing); raises if it cannot be built."""
    from moeplex.demo.build import cache_dir

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(source.read_bytes() + version.encode() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([compiler, "-O3", "-shared", "-fPIC", *flags, str(source), "-o", str(built)],
                       capture_output=True, text=True, check=True)
        os.replace(built, target)
    return target
