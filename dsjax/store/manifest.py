"""The store's manifest: schema, records, JSON I/O, checksums and the store's error types.

A dsjax store is a directory whose `manifest.json` is written last, by atomic rename: its presence is the mark of a
complete store. The manifest holds the model config (config.json as read), the quantization (format, block size,
policy), where the conversion came from, and one record per tensor of the weight pytree (dsjax/model/weights.py):

    tensors["layers.1.q_a"] = {
        "hf_name": "model.layers.1.self_attn.q_a_proj.weight",
        "unit": "layer_001",  "tier": "core" | "experts",  "path": "core/layer_001" | "experts/layer_001/gate",
        "shape": [N, K] (logical),  "dtype": "nvfp4" | "mxfp4" | "bfloat16" | "float32",  "bytes": stored bytes,
        "parts": {"packed": {"shape", "dtype", "bytes", "crc32"}, "scales": {...}, "global_scale": {...}}
                 (FP4)  or  {"weight": {...}} (plain),
        "source_dtype": "BF16" | "F32" | "F8_E4M3" | "NVFP4" ...,  "note": why a tensor stayed bf16 (optional)}

The manifest seals itself: `manifest_sha256` is the SHA-256 of the canonical JSON (sorted keys, no spaces, ASCII) of
every other field, so an edited model config (say routed_scaling_factor 2.5 -> 0.1, which changes every token
without breaking a single tensor checksum) is refused by `dsjax verify` and by loading, naming manifest.json.

Checksums are zlib.crc32 (stdlib, CRC-32/ISO-HDLC) of a part's raw bytes in C order, as 8 hex digits; routed-expert
parts carry one checksum per expert (a list), so one expert read can be checked on its own. CRC-32 rather than
blake2b: the job is catching bit rot, torn writes and truncation, not adversaries; CRC-32 detects every error burst of
up to 32 bits, releases the GIL and runs at ~3.9 GB/s per core here (blake2b: ~0.9 GB/s), so the runtime can afford
to check every expert it reads from NVMe.

This module knows nothing of orbax, TensorStore or the model math.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from typing import Any

import numpy as np

FORMAT = "dsjax-store"
SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
CHECKSUM = "crc32"
PLAIN_PART = "weight"
MANIFEST_CHECKSUM = "manifest_sha256"
# What a store directory holds besides manifest.json (writer.py's layout); any of the first four marks a directory as
# a dsjax store, finished or not.
STORE_MARKS = ("progress", "core", "experts", MANIFEST_FILE + ".tmp")


class StoreError(ValueError):
    """A store (or a conversion into one) that cannot be used; the message names the path, the tensor and the fix."""


class StoreCorruptError(StoreError):
    """Stored bytes that do not match the manifest (checksum, shape or size): the message names the tensor."""


def np_dtype(name: str) -> np.dtype:
    """numpy dtype of a manifest dtype name ('bfloat16' needs ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def checksum(a) -> str:
    """CRC-32 of an array's bytes in C order (or of a bytes-like object), as 8 hex digits."""
    if isinstance(a, np.ndarray):
        a = np.ascontiguousarray(a)
        buf = a.reshape(-1).view(np.uint8) if a.size else b""
    else:
        buf = a
    return f"{zlib.crc32(buf) & 0xFFFFFFFF:08x}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PartRecord:
    """One stored array: shape, numpy dtype name, bytes, and crc32 (one string, or one per expert on axis 0)."""

    shape: tuple[int, ...]
    dtype: str
    bytes: int
    crc32: str | tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "bytes": self.bytes,
                "crc32": list(self.crc32) if isinstance(self.crc32, tuple) else self.crc32}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "PartRecord":
        c = d["crc32"]
        return cls(shape=tuple(d["shape"]), dtype=d["dtype"], bytes=int(d["bytes"]),
                   crc32=tuple(c) if isinstance(c, list) else c)

    @classmethod
    def of(cls, a: np.ndarray, per_expert: bool = False) -> "PartRecord":
        crc = tuple(checksum(x) for x in a) if per_expert else checksum(a)
        return cls(shape=tuple(a.shape), dtype=np.dtype(a.dtype).name, bytes=int(a.nbytes), crc32=crc)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorRecord:
    """A tensor of the weight pytree as stored (see the module docstring for the fields)."""

    name: str
    hf_name: str
    unit: str
    tier: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    parts: dict[str, PartRecord]
    source_dtype: str
    note: str | None = None

    @property
    def is_fp4(self) -> bool:
        return self.dtype in ("nvfp4", "mxfp4")

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts.values())

    def to_json(self) -> dict[str, Any]:
        d = {"hf_name": self.hf_name, "unit": self.unit, "tier": self.tier, "path": self.path,
             "shape": list(self.shape), "dtype": self.dtype, "bytes": self.bytes,
             "parts": {k: p.to_json() for k, p in self.parts.items()}, "source_dtype": self.source_dtype}
        if self.note:
            d["note"] = self.note
        return d

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "TensorRecord":
        return cls(name=name, hf_name=d["hf_name"], unit=d["unit"], tier=d["tier"], path=d["path"],
                   shape=tuple(d["shape"]), dtype=d["dtype"],
                   parts={k: PartRecord.from_json(p) for k, p in d["parts"].items()},
                   source_dtype=d["source_dtype"], note=d.get("note"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    """The parsed manifest.json. `identity` is what a resumed conversion must match."""

    model_config: dict[str, Any]
    fmt: str
    block_size: int
    policy: str
    source: dict[str, Any]
    tensors: dict[str, TensorRecord]
    files: dict[str, dict[str, Any]]
    dsjax_version: str
    schema_version: int = SCHEMA_VERSION
    sealed: bool = True         # False: read from a manifest written before manifests carried their own checksum

    @property
    def identity(self) -> dict[str, Any]:
        return conversion_identity(self.source["fingerprint"], self.fmt, self.policy)

    def totals(self) -> dict[str, int]:
        t = {"bytes": 0, "core_bytes": 0, "expert_bytes": 0, "fp4_bytes": 0, "plain_bytes": 0}
        for r in self.tensors.values():
            t["bytes"] += r.bytes
            t["core_bytes" if r.tier == "core" else "expert_bytes"] += r.bytes
            t["fp4_bytes" if r.is_fp4 else "plain_bytes"] += r.bytes
        return t

    def to_json(self) -> dict[str, Any]:
        d = {"format": FORMAT, "schema_version": self.schema_version, "dsjax_version": self.dsjax_version,
             "quantization": {"format": self.fmt, "block_size": self.block_size, "policy": self.policy},
             "source": self.source, "checksum": CHECKSUM, "totals": self.totals(),
             "files": self.files, "model_config": self.model_config,
             "tensors": {k: r.to_json() for k, r in self.tensors.items()}}
        return dict(d, **{MANIFEST_CHECKSUM: manifest_digest(d)})

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = MANIFEST_FILE) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise StoreError(f"{where}: not a dsjax store manifest (format {fmt!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{where}: schema version {d.get('schema_version')} is not the {SCHEMA_VERSION} this "
                             "dsjax reads; re-convert the checkpoint with this dsjax (dsjax convert SRC DST)")
        sealed = d.get(MANIFEST_CHECKSUM)
        # Stores converted before the manifest carried its own checksum have none: they still load (their tensors
        # are checked as always), and `dsjax verify` warns that edits to their manifest cannot be detected.
        if sealed is not None and sealed != manifest_digest(d):
            raise StoreCorruptError(
                f"{where}: manifest.json was edited or damaged (its {MANIFEST_CHECKSUM} does not match its content), "
                "so its model config and tensor records cannot be trusted; convert the checkpoint again "
                "(`dsjax convert SRC DST` into a new directory), or restore the original manifest.json")
        try:
            q = d["quantization"]
            return cls(model_config=d["model_config"], fmt=q["format"], block_size=int(q["block_size"]),
                       policy=q["policy"], source=d["source"], files=d["files"], dsjax_version=d["dsjax_version"],
                       tensors={k: TensorRecord.from_json(k, r) for k, r in d["tensors"].items()},
                       sealed=sealed is not None)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed manifest ({type(e).__name__}: {e}); re-convert the store") from None


def manifest_digest(d: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a manifest dict without its own checksum field, as 'sha256:<hex>'."""
    body = {k: v for k, v in d.items() if k != MANIFEST_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def looks_like_store(path: str) -> bool:
    """True for a directory holding a dsjax store's parts (core/, experts/, a conversion journal), with or without
    manifest.json: a store, or an unfinished or damaged one."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in STORE_MARKS)


def unfinished_store_message(path: str) -> str:
    return (f"{path}: this is an unfinished or damaged dsjax store (it has no {MANIFEST_FILE}): re-run `dsjax convert "
            f"SRC {path}` to resume, or `dsjax verify {path}`")


def conversion_identity(fingerprint: str, fmt: str, policy: str) -> dict[str, Any]:
    """What makes two conversions the same job: source fingerprint, format, policy and schema version."""
    return {"schema_version": SCHEMA_VERSION, "source_fingerprint": fingerprint, "format": fmt, "policy": policy}


def write_json_atomic(path: str, obj: Any, *, fsync: bool = True) -> None:
    """Write JSON to `path` through a temporary file and rename, so readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(store: str) -> Manifest:
    """Parse `store/manifest.json` with errors that say what the directory is instead."""
    path = os.path.join(store, MANIFEST_FILE)
    if not os.path.isdir(store):
        raise StoreError(f"{store}: no such store directory")
    if not os.path.exists(path):
        if looks_like_store(store):
            raise StoreError(unfinished_store_message(store) + " (a conversion resumes with the same source, "
                             "format and policy)")
        raise StoreError(f"{store}: not a dsjax store (no {MANIFEST_FILE}); convert a checkpoint with "
                         "`dsjax convert SRC DST`")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreCorruptError(f"{path}: unreadable manifest ({e}); re-convert the store") from None
    return Manifest.from_json(raw, path)
