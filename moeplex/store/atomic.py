"""Write all-or-nothing: a folder built in a temporary sibling, or a file written beside its path, then renamed into place."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moeplex.store.errors import StoreError

PARTIAL_MARK = ".partial-"  # in the names of folders being written; never a finished store
RENAME_EXCHANGE = 2  # renameat2 flag (Linux): swap two paths in one step
AT_FDCWD = -100


@contextmanager
def staged_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; on success it becomes `out` in one rename.

    On any exception the temporary folder is removed and `out` is left as it was. The temporary name
    is `.<out name>.partial-XXXX`, so a write killed outright (SIGKILL, power loss) leaves only a
    folder that is plainly not a store.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}{PARTIAL_MARK}{secrets.token_hex(4)}"
    staging.mkdir()  # unlike mkdtemp, honours the umask: the finished store gets normal permissions
    try:
        yield staging
        sync_tree(staging)
        _publish(staging, out, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_file(path: Path, data: bytes) -> Path:
    """Replace `path` with data in one step: a crash leaves the old file or the new one, never half of one.

    Writes a temporary sibling, fsyncs it, renames it over `path`, fsyncs the folder.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync(path.parent)
    return path


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, so the rename publishes durable contents."""
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(folder)


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move staging to out. With overwrite, an existing out is swapped in one step where the OS can, and
    its old contents are left in staging (which the caller deletes)."""
    if not (overwrite and out.exists()):
        os.rename(staging, out)  # fails if a non-empty out appeared meanwhile
    elif not _exchange(staging, out):
        old = staging.with_name(staging.name + "-old")
        os.rename(out, old)
        os.rename(staging, out)
        os.rename(old, staging)
    _fsync(out.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if renameat2 is None:
        return False
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
