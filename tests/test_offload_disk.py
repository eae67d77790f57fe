"""Reading expert files past the page cache: aligned zero-copy tensors, clear errors on damaged files."""

import pytest
import safetensors.torch
import torch

from moeplex.offload.disk import ALIGNMENT, read_safetensors_uncached


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
