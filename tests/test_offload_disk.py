"""Reading expert files past the page cache: aligned zero-copy tensors, clear errors on damaged files."""

import errno
import json
import os

import pytest
import safetensors.torch
import torch

from moeplex.offload import disk
from moeplex.offload.disk import ALIGNMENT, read_safetensors_uncached
from moeplex.store.aligned_safetensors import save_aligned


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reads_tensors_aligned_and_equal_to_what_was_written(tmp_path, dtype):
    generator = torch.Generator().manual_seed(61)
    # sizes that are multiples of 64 bytes, like real experts', so every tensor (not only the first) is aligned
    written = {"gate_up": torch.randn(16, 8, generator=generator).to(dtype), "down": torch.randn(8, 8, generator=generator).to(dtype)}
    path = tmp_path / "expert.safetensors"
    safetensors.torch.save_file(written, str(path))
    tensors, nbytes = read_safetensors_uncached(path)
    assert nbytes == path.stat().st_size
    assert set(tensors) == set(written)
    for name, tensor in written.items():
        assert torch.equal(tensors[name], tensor)
        assert tensors[name].data_ptr() % ALIGNMENT == 0


def test_a_truncated_file_is_a_value_error(tmp_path):
    path = tmp_path / "expert.safetensors"
    safetensors.torch.save_file({"down": torch.randn(8, 6, generator=torch.Generator().manual_seed(62))}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="outside the file or has the wrong size"):
        read_safetensors_uncached(path)


def _expert_file(tmp_path, seed, save=save_aligned):
    generator = torch.Generator().manual_seed(seed)
    written = {"gate_up": torch.randn(64, 48, generator=generator).bfloat16(), "down": torch.randn(48, 32, generator=generator).bfloat16()}
    path = tmp_path / "expert.safetensors"
    path.write_bytes(save(written))
    return path, written


@pytest.mark.parametrize("direct_io", [True, False])
def test_store_blobs_start_their_data_aligned_and_are_read_without_a_copy(tmp_path, direct_io):
    path, written = _expert_file(tmp_path, 63)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header) % ALIGNMENT == 0
    assert safetensors.torch.load(path.read_bytes()).keys() == written.keys()  # still plain safetensors
    tensors, _ = read_safetensors_uncached(path, direct_io)
    offsets = {name: entry["data_offsets"][0] for name, entry in json.loads(path.read_bytes()[8 : 8 + header]).items() if name != "__metadata__"}
    # views of the one read buffer: as far apart in memory as in the file
    assert tensors["down"].data_ptr() - tensors["gate_up"].data_ptr() == offsets["down"] - offsets["gate_up"]
    for name, tensor in written.items():
        assert torch.equal(tensors[name], tensor)
        assert tensors[name].data_ptr() % ALIGNMENT == 0


def test_a_file_system_without_direct_io_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    path, written = _expert_file(tmp_path, 64, save=safetensors.torch.save)
    real_open = os.open

    def refuse_direct(file, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args)

    monkeypatch.setattr(disk.os, "open", refuse_direct)
    tensors, nbytes = read_safetensors_uncached(path)
    assert nbytes == path.stat().st_size
    for name, tensor in written.items():
        assert torch.equal(tensors[name], tensor)
        assert tensors[name].data_ptr() % ALIGNMENT == 0


def test_short_reads_off_a_block_boundary_are_finished_through_the_page_cache(tmp_path, monkeypatch):
    path, written = _expert_file(tmp_path, 65)
    real_preadv = os.preadv

    def short_preadv(fd, buffers, offset):  # at most 5000 bytes a call: never a whole number of blocks
        return real_preadv(fd, [buffers[0][:5000]], offset)

    monkeypatch.setattr(disk.os, "preadv", short_preadv)
    tensors, _ = read_safetensors_uncached(path)
    for name, tensor in written.items():
        assert torch.equal(tensors[name], tensor)
