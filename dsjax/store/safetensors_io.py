"""Lazy reading of Hugging Face safetensors checkpoints, tensor by tensor, with every dtype DeepSeek ships.

Parses the safetensors header itself (8-byte little-endian length, JSON header, raw data) and memory-maps the data,
so reading one tensor touches only its bytes and FP8 (F8_E4M3) works through ml_dtypes. Owns file access and
validation (truncated or corrupt shards get an error naming the file and tensor); knows nothing of the model.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or lacks a tensor; the message names which."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str
    dtype: str          # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int          # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One .safetensors file: header parsed at open, tensors memory-mapped on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated (shorter than the 8-byte header length)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100 << 20:
                    raise CheckpointError(f"{path}: corrupt header length {n} (file has {size} bytes)")
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid ({e}); re-download this file") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is not valid (a JSON {type(header).__name__}, not an "
                                  "object); re-download this file")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            try:
                b, e = (int(x) for x in h["data_offsets"])
                if not isinstance(h["dtype"], str):
                    raise TypeError(f"dtype {h['dtype']!r} is not a string")
                info = TensorInfo(name, path, h["dtype"], tuple(int(d) for d in h["shape"]), base + b, base + e)
                if min(info.shape, default=0) < 0 or not base <= info.begin <= info.end:
                    raise ValueError(f"shape {list(info.shape)}, data_offsets {[b, e]}")
            except (KeyError, TypeError, ValueError) as err:
                what = f"missing field {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
                raise CheckpointError(f"{path}: safetensors header is not valid (tensor {name!r}: {what}); "
                                      "re-download this file") from None
            if info.end > size:
                raise CheckpointError(
                    f"{path}: truncated: tensor {name!r} needs bytes up to {info.end}, file has {size}; "
                    "re-download or re-convert this shard")
            if info.dtype not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.dtype}")
            expected = int(np.prod(info.shape, dtype=np.int64)) * DTYPES[info.dtype].itemsize
            if expected != info.nbytes:
                raise CheckpointError(f"{path}: tensor {name!r} shape {list(info.shape)} {info.dtype} needs "
                                      f"{expected} bytes but the header gives {info.nbytes}")
            self.tensors[name] = info
        self._mm: mmap.mmap | None = None

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy array backed by the file mapping (copy it to keep it)."""
        info = self.tensors[name]
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self._mm, dtype=DTYPES[info.dtype], count=int(np.prod(info.shape, dtype=np.int64)),
                             offset=info.begin).reshape(info.shape)

    def close(self) -> None:
        # Arrays handed out may still view the mapping; dropping our reference unmaps once they are gone.
        self._mm = None


class Checkpoint:
    """A Hugging Face checkpoint directory: `model.safetensors` or shards listed in `model.safetensors.index.json`.

    Example:
        >>> ck = Checkpoint("path/to/DeepSeek-V3")
        >>> ck.info("model.norm.weight").shape, ck.read("model.norm.weight").dtype
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index = os.path.join(self.path, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(self.path, SINGLE_FILE)):
            files, weight_map = [SINGLE_FILE], None
        else:
            files = sorted(f for f in os.listdir(self.path) if f.endswith(".safetensors")) \
                if os.path.isdir(self.path) else []
            if not files:
                raise CheckpointError(f"{self.path}: no safetensors files (expected {SINGLE_FILE} or {INDEX_FILE})")
            weight_map = None
        self.files: dict[str, SafetensorsFile] = {}
        for fn in files:
            p = os.path.join(self.path, fn)
            if not os.path.exists(p):
                raise CheckpointError(f"{p}: shard listed in {INDEX_FILE} is missing")
            self.files[fn] = SafetensorsFile(p)
        self._infos: dict[str, TensorInfo] = {}
        for sf in self.files.values():
            self._infos.update(sf.tensors)
        if weight_map is not None:
            for name, fn in weight_map.items():
                if name not in self._infos:
                    raise CheckpointError(f"{os.path.join(self.path, fn)}: index lists tensor {name!r} but the shard "
                                          "does not contain it")

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: missing tensor {name!r}") from None

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        return self.files[os.path.basename(info.file)].read(name)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    def close(self) -> None:
        for f in self.files.values():
            f.close()
