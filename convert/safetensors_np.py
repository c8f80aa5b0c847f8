"""Read safetensors files with numpy only, one tensor (or one slice of it) at a time.

    >>> st = SafetensorsFile("model.safetensors")          # doctest: +SKIP
    >>> for t in st.tensors: print(t.name, t.dtype, t.shape)  # doctest: +SKIP

Nothing is loaded up front but the JSON header: tensors are read through a memory map, in row
chunks, so converting a model never holds more than one chunk of one tensor in memory. The header is
checked against the file's size, so a truncated download fails here, naming the file, instead of
producing a GGUF with garbage in it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# safetensors dtype -> (numpy dtype of the raw storage, bytes per element)
_STORAGE = {
    "BF16": (np.uint16, 2),   # no numpy bfloat16: kept as raw 16-bit words, widened by `to_float32`
    "F16": (np.float16, 2),
    "F32": (np.float32, 4),
}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be converted; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorRef:
    name: str
    dtype: str                 # safetensors dtype: BF16, F16 or F32
    shape: tuple[int, ...]     # PyTorch order (rows first)
    path: Path
    offset: int                # absolute byte offset of the data in `path`
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def rows(self, max_elements: int = 1 << 22):
        """Yield the tensor as float32 arrays of whole rows, at most ~max_elements each (C order)."""
        storage, _ = _STORAGE[self.dtype]
        raw = np.memmap(self.path, dtype=storage, mode="r", offset=self.offset, shape=(self.n_elements,))
        row = self.shape[-1] if self.shape else 1
        step = max(row, (max_elements // row) * row)
        for start in range(0, self.n_elements, step):
            yield to_float32(np.asarray(raw[start:start + step]), self.dtype)
        del raw


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen raw storage to float32 exactly (bf16 is the top half of a float32)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file (header says {n} bytes, file has {size})")
            try:
                meta = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        base = 8 + n
        tensors = []
        for name, m in meta.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = m["dtype"], tuple(m["shape"]), m["data_offsets"]
            if dtype not in _STORAGE:
                raise CheckpointError(f"{self.path}: tensor {name} has dtype {dtype}; only BF16, F16 and F32 are supported")
            if base + end > size:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({name} ends at byte {base + end}, "
                                      f"file has {size}); download it again")
            ref = TensorRef(name, dtype, shape, self.path, base + start, end - start)
            if ref.n_elements * _STORAGE[dtype][1] != ref.nbytes:
                raise CheckpointError(f"{self.path}: tensor {name} has {ref.nbytes} bytes for shape {shape}")
            tensors.append(ref)
        # Sorted by name, the order the safetensors library (and llama.cpp's converter) iterates in.
        self.tensors = sorted(tensors, key=lambda t: t.name)


def checkpoint_tensors(checkout: Path) -> list[TensorRef]:
    """All tensors of a checkout: model.safetensors, or the shards its index names, in file then name order."""
    index = checkout / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: no usable weight_map ({e})") from None
        parts = sorted(set(weight_map.values()))
    else:
        parts = sorted(p.name for p in checkout.glob("model*.safetensors"))
        weight_map = None
    if not parts:
        raise CheckpointError(f"{checkout}: no model.safetensors (or index and shards) found")
    tensors: list[TensorRef] = []
    for part in parts:
        path = checkout / part
        if not path.is_file():
            raise CheckpointError(f"{path}: missing shard named by {index.name}")
        tensors += SafetensorsFile(path).tensors
    if weight_map is not None:
        missing = sorted(set(weight_map) - {t.name for t in tensors})
        if missing:
            raise CheckpointError(f"{index}: {len(missing)} tensors named in the index are not in the shards, e.g. {missing[0]}")
    return tensors
