"""Reading safetensors files past the page cache: O_DIRECT where the file system allows it, else read then drop the pages.

So a benchmark that reads an expert twice pays the disk twice, as it would with a cold cache. With
O_DIRECT the disk copies straight into our buffer and the kernel makes no copy out of its page cache, so
a read costs the reading thread little CPU: on the 2-core EPYC VM it cut the offloaded systems' wait for
experts in `moeplex bench offload` by 3-38% against `--page-cache-reads` (docs/offloading.md).
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import torch

from moeplex.store.aligned_safetensors import ALIGNMENT

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I8": torch.int8,  # quantized copies (moeplex.quant.store_copies)
    "U8": torch.uint8,
}


DIRECT_IO_BLOCK = 4096  # O_DIRECT needs buffer address, file offset and length in multiples of the logical block size


def read_safetensors_uncached(path: Path, direct_io: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors, bytes read) of a safetensors file read whole past the page cache, every tensor ALIGNMENT-aligned.

    Tensors view the read buffer (no copy) when the file's data section starts ALIGNMENT-aligned (store
    files are written so, `moeplex.store.aligned_safetensors`); otherwise a tensor that would land misaligned
    is copied. direct_io=False reads through the page cache (then drops the pages) even where O_DIRECT
    works. OSError if the file cannot be read, ValueError if it is not a well-formed safetensors file.
    """
    size = os.stat(path).st_size
    view = _read_direct(path, size) if direct_io else None
    if view is None:  # asked to, or the file system refuses O_DIRECT (tmpfs, some network file systems)
        view = _read_buffered(path, size)
    tensors = parse_safetensors(view)
    return {name: t if t.data_ptr() % ALIGNMENT == 0 else t.clone() for name, t in tensors.items()}, size


def _aligned_buffer(nbytes: int, alignment: int, offset: int = 0) -> memoryview:
    """A fresh buffer of nbytes whose byte `offset` sits at an `alignment`-aligned address."""
    buffer = torch.empty(nbytes + alignment, dtype=torch.uint8)
    start = (-(buffer.data_ptr() + offset)) % alignment
    return memoryview(buffer.numpy())[start : start + nbytes]


def _read_direct(path: Path, size: int) -> memoryview | None:
    """The file's bytes read with O_DIRECT, or None where the file system does not support it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    try:
        padded = -(-size // DIRECT_IO_BLOCK) * DIRECT_IO_BLOCK
        view = _aligned_buffer(padded, DIRECT_IO_BLOCK)
        done = 0
        while done < size and done % DIRECT_IO_BLOCK == 0:
            try:
                count = os.preadv(fd, [view[done:]], done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and done == 0:
                    return None  # opened, but this file system cannot read it directly after all
                raise
            if count == 0:
                raise OSError(f"file ended after {done} of {size} bytes")
            done += count
    finally:
        os.close(fd)
    if done < size:  # a short read off a block boundary: the rest through the page cache
        _read_into(path, view, done, size)
    return view[:size]


def _read_buffered(path: Path, size: int) -> memoryview:
    """The file's bytes read through the page cache, its pages then dropped; the data section placed ALIGNMENT-aligned."""
    fd = os.open(path, os.O_RDONLY)
    try:
        prefix = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    if len(prefix) < 8:
        raise ValueError("shorter than a safetensors header")
    view = _aligned_buffer(size, ALIGNMENT, offset=8 + struct.unpack("<Q", prefix)[0])
    _read_into(path, view, 0, size)
    return view


def _read_into(path: Path, view: memoryview, start: int, size: int) -> None:
    """Bytes [start, size) of the file into view, through the page cache; the file's pages are dropped after."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = start
        while done < size:
            count = os.preadv(fd, [view[done:size]], done)
            if count == 0:
                raise OSError(f"file ended after {done} of {size} bytes")
            done += count
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def parse_safetensors(data: memoryview) -> dict[str, torch.Tensor]:
    """Tensors viewing `data` (no copy); ValueError if the header is malformed or points outside the file."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (header_size,) = struct.unpack("<Q", data[:8])
    if 8 + header_size > len(data):
        raise ValueError(f"header of {header_size} bytes does not fit in {len(data)} bytes")
    header = json.loads(bytes(data[8 : 8 + header_size]))
    base, tensors = 8 + header_size, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor '{name}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        numel = 1
        for size in info["shape"]:
            numel *= size
        if base + end > len(data) or end - start != numel * dtype.itemsize:
            raise ValueError(f"tensor '{name}' lies outside the file or has the wrong size (truncated?)")
        flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + start) if numel else torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors
