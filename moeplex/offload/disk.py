"""Reading safetensors files past the page cache: read once, then drop the file's pages (POSIX_FADV_DONTNEED).

So a benchmark that reads an expert twice pays the disk twice, as it would with a cold cache.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I8": torch.int8,  # quantized copies (moeplex.quant.store_copies)
    "U8": torch.uint8,
}


ALIGNMENT = 64  # bytes; GEMV kernels run about 30% slower on weights that are only 8-byte aligned


def read_safetensors_uncached(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors, bytes read) of a safetensors file read whole, its data aligned to ALIGNMENT, its pages then dropped.

    OSError if the file cannot be read, ValueError if it is not a well-formed safetensors file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        data_start = 8 + struct.unpack("<Q", prefix)[0]
        pad = -data_start % ALIGNMENT  # torch allocations are ALIGNMENT-aligned
        buffer = torch.empty(pad + size, dtype=torch.uint8)
        view = memoryview(buffer.numpy())[pad:]
        done = 0
        while done < size:
            count = os.preadv(fd, [view[done:]], done)
            if count == 0:
                raise OSError(f"file ended after {done} of {size} bytes")
            done += count
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return parse_safetensors(view), size


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
