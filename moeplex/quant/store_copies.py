"""Quantized copies of a store's experts, kept beside the bf16 ones so that int8/int4 experts load without quantizing.

A copy is `<store>/quantized/<format>/<expert id>.safetensors`, format `int8` or `int4-g<group size>`, listed
in `<store>/quantized/index.json` (`moeplex.store.copy_index`; docs/store-format.md). Its tensors are the same
on every device; per matrix m in (gate_up, down):

    int8: m.qweight int8 [N, K], m.scales bf16 [N]
    int4: m.nibbles uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high one; values 0..15),
          m.scales_and_zeros bf16 [K/group_size, N, 2]

and int4 is packed for the kernel of the device it is read to. A copy holds exactly what `quantize_expert`
makes of the expert cast to bf16 (COPY_SOURCE_DTYPE).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from tqdm import tqdm

from moeplex.errors import ExpertReadError
from moeplex.offload.disk import read_safetensors_uncached
from moeplex.quant.experts import QuantizedExpert
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, UNQUANTIZED
from moeplex.quant.int4 import Int4Weight, int4_codes
from moeplex.quant.int8 import Int8Weight, quantize_int8
from moeplex.quant.precision import LinearWeight, check_precision
from moeplex.store.aligned_safetensors import save_aligned
from moeplex.store.atomic import replace_file
from moeplex.store.blobs import read_checked
from moeplex.store.checksums import sha256_bytes
from moeplex.store.copy_index import CopyIndex, copy_format, read_copy_index, write_copy_index
from moeplex.store.errors import StoreError
from moeplex.store.layout import QUANTIZED_INDEX, quantized_file
from moeplex.store.manifest import BlobEntry
from moeplex.store.reader import StoreReader

__all__ = ["COPY_SOURCE_DTYPE", "QuantizedCopies", "copy_format", "write_quantized_copies"]

COPY_SOURCE_DTYPE = torch.bfloat16  # copies quantize the expert as a bf16 model holds it
MATRICES = ("gate_up", "down")

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # tensor name -> (shape, dtype)


class QuantizedCopies:
    """The quantized copies that a store's index lists, each read when asked for."""

    def __init__(self, root: Path, index: CopyIndex, shapes: Mapping[str, tuple[int, int]]):
        self.root, self.index = Path(root), index
        self.shapes = dict(shapes)  # matrix -> (N, K): gate_up (2I, H), down (H, I)

    @classmethod
    def load(cls, store: str | Path) -> QuantizedCopies:
        """The store's copies (none when it has no index); StoreError naming the index when it is malformed."""
        root = Path(store)
        index = read_copy_index(root)
        return cls(root, index, _matrix_shapes(root) if any(index.values()) else {})

    def has(self, expert_id: str, precision: str, group_size: int = DEFAULT_GROUP_SIZE) -> bool:
        return expert_id in self.index.get(copy_format(precision, group_size), {})

    def read(
        self,
        expert_id: str,
        precision: str,
        group_size: int = DEFAULT_GROUP_SIZE,
        uncached: bool = False,
        device: torch.device | str = "cpu",
    ) -> tuple[QuantizedExpert, int]:
        """(the expert compute-ready on `device`, bytes read from disk).

        Cached: read whole and checked against the index's size and sha256, then deserialized. Uncached
        (past the page cache, as offloading reads): size and tensors checked, not the sha256, which
        `verify_store` checks (hashing every fetch would cost more CPU than the matmuls it feeds).
        KeyError when there is no such copy; ExpertReadError naming the file and the expert when the file
        is not what the index says (size, checksum, tensor names, shapes, dtypes).
        """
        fmt = copy_format(precision, group_size)
        entry = self.index.get(fmt, {}).get(expert_id)
        if entry is None:
            raise KeyError(f"{self.root}: no {fmt} copy of expert {expert_id}")
        what, path = f"{fmt} copy of expert {expert_id}", self.root / entry.file
        try:
            tensors, nbytes = self._read_tensors(what, entry, uncached)
        except StoreError as exc:
            raise ExpertReadError(str(exc)) from exc
        except (OSError, ValueError, SafetensorError) as exc:
            raise ExpertReadError(f"{what}: cannot read {path} ({exc})") from exc
        expected = {
            f"{matrix}.{name}": spec
            for matrix, (rows, columns) in self.shapes.items()
            for name, spec in _stored_layout(precision, group_size, rows, columns).items()
        }
        found = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
        if found != expected:
            raise ExpertReadError(f"{what}: {path} holds {_describe(found)}, expected {_describe(expected)}")
        by_matrix: dict[str, dict[str, torch.Tensor]] = {matrix: {} for matrix in MATRICES}
        for name, tensor in tensors.items():
            matrix, part = name.split(".", 1)
            by_matrix[matrix][part] = tensor
        gate_up, down = (_weight_from_stored(by_matrix[matrix], precision, group_size, device) for matrix in MATRICES)
        return QuantizedExpert(precision, gate_up, down), nbytes

    def read_many(
        self, precision_of_id: Mapping[str, str], group_size: int = DEFAULT_GROUP_SIZE, device: torch.device | str = "cpu"
    ) -> dict[str, QuantizedExpert]:
        """Those of the given experts that have a copy in their precision (bf16 ones never do), read onto `device`."""
        return {
            expert_id: self.read(expert_id, precision, group_size, device=device)[0]
            for expert_id, precision in precision_of_id.items()
            if precision != UNQUANTIZED and self.has(expert_id, precision, group_size)
        }

    def _read_tensors(self, what: str, entry: BlobEntry, uncached: bool) -> tuple[dict[str, torch.Tensor], int]:
        if uncached:
            tensors, nbytes = read_safetensors_uncached(self.root / entry.file)
            if nbytes != entry.bytes:
                raise ValueError(f"{nbytes} bytes, {QUANTIZED_INDEX} says {entry.bytes} (truncated or replaced)")
            return tensors, nbytes
        data = read_checked(self.root, what, entry, QUANTIZED_INDEX)
        return safetensors.torch.load(data), len(data)


def write_quantized_copies(
    store: str | Path, precision_of_id: Mapping[str, str], group_size: int = DEFAULT_GROUP_SIZE, progress: bool = True
) -> int:
    """Write a copy of every given expert whose precision is int8 or int4 and that has none yet; returns how many.

    Each expert is read from its blob (checked against the manifest), cast to bf16 and quantized by the
    quantizers `quantize_expert` uses; each copy is written atomically, and the index is replaced once at the
    end, or when the loop is interrupted, listing only the copies whose files are complete. ValueError naming
    an expert id the manifest does not have, or an unknown precision, before anything is written.
    """
    reader = StoreReader(store)
    unknown = sorted(set(precision_of_id) - set(reader.manifest.experts))
    if unknown:
        raise ValueError(f"{reader.path}: expert ids not in the store's manifest: {unknown[:5]}")
    precisions = {check_precision(precision) for precision in precision_of_id.values()} - {UNQUANTIZED}
    format_of = {precision: copy_format(precision, group_size) for precision in precisions}
    index = {fmt: dict(entries) for fmt, entries in read_copy_index(reader.path).items()}
    missing = [
        (expert_id, precision)
        for expert_id, precision in precision_of_id.items()
        if precision in format_of and expert_id not in index.get(format_of[precision], {})
    ]
    written = 0
    try:
        for expert_id, precision in tqdm(missing, desc="quantized copies", unit="expert", disable=not progress, leave=False):
            fmt = format_of[precision]
            index.setdefault(fmt, {})[expert_id] = _write_copy(reader, expert_id, precision, group_size, fmt)
            written += 1
    finally:
        if written:
            write_copy_index(reader.path, index)
    return written


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (0..15) -> [N, K/2] uint8, column 2j in the low nibble and 2j+1 in the high one."""
    return (q[:, 0::2] | q[:, 1::2] << 4).to(torch.uint8)


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """pack_nibbles' inverse: [N, K/2] uint8 -> q [N, K] int32."""
    return torch.stack([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(nibbles.shape[0], -1).to(torch.int32)


def _stored_layout(precision: str, group_size: int, rows: int, columns: int) -> Layout:
    """Shapes and dtypes of one [rows, columns] matrix's tensors in a copy."""
    if precision == "int8":
        return {"qweight": ((rows, columns), torch.int8), "scales": ((rows,), torch.bfloat16)}
    return {
        "nibbles": ((rows, columns // 2), torch.uint8),
        "scales_and_zeros": ((columns // group_size, rows, 2), torch.bfloat16),
    }


def _stored_tensors(weight: torch.Tensor, precision: str, group_size: int) -> dict[str, torch.Tensor]:
    """One matrix [N, K] quantized, as a copy stores it."""
    if precision == "int8":
        quantized = quantize_int8(weight)
        return {"qweight": quantized.qweight, "scales": quantized.scales}
    q, scales_and_zeros = int4_codes(weight, group_size)
    return {"nibbles": pack_nibbles(q), "scales_and_zeros": scales_and_zeros}


def _weight_from_stored(
    tensors: Mapping[str, torch.Tensor], precision: str, group_size: int, device: torch.device | str
) -> LinearWeight:
    """_stored_tensors' inverse, ready for the kernels of `device`."""
    if precision == "int8":
        return Int8Weight(tensors["qweight"].to(device), tensors["scales"].to(device))
    q = unpack_nibbles(tensors["nibbles"]).to(device)
    scales_and_zeros = tensors["scales_and_zeros"].to(device, copy=True)  # a view would keep the file's buffer alive
    return Int4Weight.from_codes(q, scales_and_zeros, group_size)


def _write_copy(reader: StoreReader, expert_id: str, precision: str, group_size: int, fmt: str) -> BlobEntry:
    expert = reader.read_expert(expert_id)
    if set(expert) != set(MATRICES):
        raise ValueError(f"expert {expert_id}: copies are of SwiGLU experts {MATRICES}, this store's hold {sorted(expert)}")
    tensors = {
        f"{matrix}.{name}": tensor
        for matrix in MATRICES
        for name, tensor in _stored_tensors(expert[matrix].to(COPY_SOURCE_DTYPE), precision, group_size).items()
    }
    data = save_aligned(tensors)
    relative = quantized_file(fmt, expert_id)
    path = reader.path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data)
    return BlobEntry(relative, len(data), sha256_bytes(data))


def _matrix_shapes(root: Path) -> dict[str, tuple[int, int]]:
    """(N, K) of each expert matrix, from the store's model spec."""
    reader = StoreReader(root)
    spec = reader.spec(reader.variants[0])
    inter, hidden = spec.expert_intermediate_size, spec.hidden_size
    return {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def _describe(layout: Layout) -> str:
    return ", ".join(f"{name} {list(shape)} {str(dtype).removeprefix('torch.')}" for name, (shape, dtype) in sorted(layout.items()))
