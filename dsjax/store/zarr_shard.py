"""The on-disk layout of routed-expert arrays: zarr v3, one shard file per array, one inner chunk per expert.

Each (layer, projection, part) array [E, ...] is a zarr3 array whose single shard (`c/0/0/0`) holds every expert, and
whose inner chunk is one expert [1, ...] stored raw (`bytes` codec, no compression), so reading expert e is one
contiguous pread. The shard index ([E, 1, 1, 2] little-endian uint64 (offset, nbytes) pairs at the end of the file,
zarr v3 `sharding_indexed`, ZEP 2) is protected by a CRC-32C (`crc32c` index codec): TensorStore refuses a shard
whose index is damaged or whose tail was cut off. The expert bytes themselves are covered by the manifest's
per-expert CRC-32 (manifest.py), which the reader checks.

TensorStore writes a zarr3 shard only whole (anything else is read-modify-write), so the converter streams shards
itself with `ShardWriter`: experts are appended one at a time, then the index; peak memory is one expert, not one
layer. TensorStore creates `zarr.json` and reads everything back (reader.py), so the format stays standard zarr3.
"""

# E experts

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

_EMPTY = 0xFFFFFFFFFFFFFFFF     # index entry of a missing chunk


def _crc32c_table() -> list[int]:
    poly = 0x82F63B78           # Castagnoli, reflected
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) as the zarr3 `crc32c` codec computes it. Pure Python: only used on shard indexes
    (16 bytes per expert), never on weight bytes."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def zarr3_metadata(shape: tuple[int, ...], dtype: np.dtype) -> dict[str, Any]:
    """zarr3 metadata of an expert array [E, ...]: one shard, inner chunk = one expert, raw little-endian bytes."""
    shape = tuple(int(s) for s in shape)
    chunk = (1,) + shape[1:]
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}]
    return {
        "shape": list(shape), "data_type": np.dtype(dtype).name, "fill_value": 0,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shape)}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(chunk), "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
    }


def tensorstore_spec(path: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.abspath(path)}}
    if metadata is not None:
        spec["metadata"] = metadata
    return spec


def create_array(path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Create the zarr3 array's `zarr.json` through TensorStore (which validates it); writes no chunk."""
    import tensorstore as ts
    ts.open(tensorstore_spec(path, zarr3_metadata(shape, dtype)), create=True, delete_existing=True).result()


class ShardWriter:
    """Streams the single shard of an expert array: `append` experts 0..E-1 in order, then `close`.

    The file is written under a temporary name and renamed on `close`, after an fsync, so a shard file that exists is
    whole. Little-endian hosts only (the `bytes` codec says little endian and we write native order).
    """

    def __init__(self, path: str, shape: tuple[int, ...], dtype: np.dtype):
        if np.little_endian is False:  # pragma: no cover - no big-endian hosts in sight
            raise RuntimeError("ShardWriter writes native byte order and needs a little-endian host")
        self.shape = tuple(shape)
        self.path = shard_file(path, len(self.shape))
        self.dtype = np.dtype(dtype)
        self.chunk_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._tmp = self.path + ".partial"
        self._f = open(self._tmp, "wb")
        self._index: list[tuple[int, int]] = []

    def append(self, expert: np.ndarray) -> None:
        e = len(self._index)
        if e >= self.shape[0]:
            raise ValueError(f"{self.path}: more than {self.shape[0]} experts appended")
        if expert.shape != self.shape[1:] or expert.dtype != self.dtype:
            raise ValueError(f"{self.path}: expert {e} is {expert.dtype}{list(expert.shape)}, expected "
                             f"{self.dtype}{list(self.shape[1:])}")
        buf = np.ascontiguousarray(expert)
        self._f.write(buf.reshape(-1).view(np.uint8).data if buf.size else b"")
        self._index.append((e * self.chunk_bytes, self.chunk_bytes))

    def close(self) -> None:
        if len(self._index) != self.shape[0]:
            raise ValueError(f"{self.path}: {len(self._index)} of {self.shape[0]} experts written")
        index = b"".join(struct.pack("<QQ", o, n) for o, n in self._index)
        self._f.write(index + struct.pack("<I", crc32c(index)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


def shard_file(array_path: str, rank: int) -> str:
    """The array's one shard: chunk key `c/0/.../0` (default key encoding, one grid cell per axis)."""
    return os.path.join(array_path, "c", *(["0"] * rank))


def read_shard_index(array_path: str, rank: int, n_experts: int) -> np.ndarray:
    """(offset, nbytes) per expert, uint64 [E, 2], from the shard's index (CRC-32C checked)."""
    path = shard_file(array_path, rank)
    size = os.path.getsize(path)
    n = n_experts * 16
    if size < n + 4:
        raise ValueError(f"{path}: {size} bytes, too short for a {n_experts}-expert shard index")
    with open(path, "rb") as f:
        f.seek(size - n - 4)
        raw = f.read(n + 4)
    (stored,) = struct.unpack("<I", raw[n:])
    if crc32c(raw[:n]) != stored:
        raise ValueError(f"{path}: shard index CRC-32C mismatch (file truncated or damaged)")
    idx = np.frombuffer(raw[:n], "<u8").reshape(n_experts, 2)
    if (idx == _EMPTY).any():
        raise ValueError(f"{path}: shard index has missing experts")
    return idx
