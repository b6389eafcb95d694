"""`dsjax verify STORE`: re-read every byte of a store and check it against the manifest.

Checks, each failure reported with the tensor's name (and the expert, for routed experts):
    manifest.json                                      its own SHA-256 (an edited manifest is refused outright)
    copied files (config.json, tokenizer files)       size and CRC-32
    core tensors (orbax checkpoints)                   restorable, shape, dtype, CRC-32 per part
    routed-expert arrays (zarr3 shards)                zarr.json shape/dtype, shard file size (truncation), shard
                                                       index CRC-32C and layout (one contiguous chunk per expert),
                                                       CRC-32 of every expert of every part
Reads experts in batches, so memory stays at a few experts whatever the model size.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dsjax.store.manifest import (
    MANIFEST_CHECKSUM, MANIFEST_FILE, PLAIN_PART, Manifest, StoreError, TensorRecord, checksum, np_dtype, read_manifest,
)
from dsjax.store.zarr_shard import read_shard_index, shard_file


@dataclasses.dataclass(frozen=True)
class Problem:
    tensor: str                 # tensor name ('layers.1.experts_gate'), or a file name
    message: str
    part: str | None = None
    expert: int | None = None

    def __str__(self) -> str:
        where = self.tensor + (f" part {self.part}" if self.part else "") + \
            (f" expert {self.expert}" if self.expert is not None else "")
        return f"{where}: {self.message}"


@dataclasses.dataclass
class VerifyReport:
    path: str
    tensors: int = 0
    bytes: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)     # worth knowing, but the store is usable

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.path}: checked {self.tensors} tensors, {self.bytes / 1e6:.1f} MB"
        notes = [f"  warning: {w}" for w in self.warnings]
        if self.ok:
            return "\n".join(notes + [head + ": OK"])
        return "\n".join(notes + [head + f": {len(self.problems)} problem(s)"] + [f"  {p}" for p in self.problems])


def _check_files(path: str, m: Manifest, report: VerifyReport) -> None:
    for fn, rec in m.files.items():
        p = os.path.join(path, fn)
        if not os.path.exists(p):
            report.problems.append(Problem(fn, "file is missing"))
            continue
        with open(p, "rb") as f:
            data = f.read()
        if len(data) != rec["bytes"] or checksum(data) != rec["crc32"]:
            report.problems.append(Problem(fn, f"{len(data)} bytes, crc32 {checksum(data)}; manifest says "
                                               f"{rec['bytes']} bytes, crc32 {rec['crc32']}"))


def _check_core(path: str, m: Manifest, report: VerifyReport) -> None:
    from dsjax.store.reader import abstract_tree, core_key, orbax_restore, read_core_direct
    units: dict[str, list[TensorRecord]] = {}
    for r in m.tensors.values():
        if r.tier == "core":
            units.setdefault(r.unit, []).append(r)
    for unit, records in units.items():
        ckpt = os.path.join(path, records[0].path)
        try:
            tree = orbax_restore(ckpt, abstract_tree(records), None)
            loaded = [(r, tree[core_key(r)] if r.is_fp4 else {PLAIN_PART: tree[core_key(r)]}, None) for r in records]
        except Exception:
            loaded = list(read_core_direct(ckpt, records))    # orbax names a file, not a tensor: go array by array
        for r, parts, err in loaded:
            if err:
                report.problems.append(Problem(r.name, f"cannot be restored from {r.path}: {err}"))
                report.tensors += 1
                continue
            for name, p in r.parts.items():
                a = np.asarray(parts[name])
                if tuple(a.shape) != tuple(p.shape) or a.dtype.name != p.dtype:
                    report.problems.append(Problem(r.name, f"stored {a.dtype.name}{list(a.shape)}, manifest says "
                                                           f"{p.dtype}{list(p.shape)}", name))
                elif checksum(a) != p.crc32:
                    report.problems.append(Problem(r.name, f"crc32 {checksum(a)} != manifest {p.crc32} "
                                                           f"(in {r.path})", name))
                report.bytes += a.nbytes
            report.tensors += 1


def _check_experts(path: str, m: Manifest, report: VerifyReport, batch: int) -> None:
    import tensorstore as ts
    from dsjax.store.zarr_shard import tensorstore_spec
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    for r in m.tensors.values():
        if r.tier != "experts":
            continue
        report.tensors += 1
        for part, p in r.parts.items():
            E, rank = p.shape[0], len(p.shape)
            apath = os.path.join(path, r.path, part)
            sf = shard_file(apath, rank)
            chunk = p.bytes // E
            expected = p.bytes + 16 * E + 4
            if not os.path.exists(sf):
                report.problems.append(Problem(r.name, f"shard file {sf} is missing", part))
                continue
            size = os.path.getsize(sf)
            if size != expected:
                report.problems.append(Problem(r.name, f"shard file {sf} has {size} bytes, expected {expected} "
                                                       "(truncated or overwritten)", part))
                continue
            try:
                idx = read_shard_index(apath, rank, E)
                arr = ts.open(tensorstore_spec(apath), context=ctx, read=True, open=True).result()
            except Exception as e:
                report.problems.append(Problem(r.name, f"unreadable ({e})", part))
                continue
            layout = np.stack([np.arange(E, dtype=np.uint64) * chunk, np.full(E, chunk, np.uint64)], axis=1)
            if not np.array_equal(idx, layout):
                report.problems.append(Problem(r.name, "shard index is not one contiguous chunk per expert in "
                                                       "order", part))
            if tuple(arr.shape) != tuple(p.shape) or arr.dtype.numpy_dtype != np_dtype(p.dtype):
                report.problems.append(Problem(r.name, f"zarr.json says {arr.dtype.numpy_dtype}{list(arr.shape)}, "
                                                       f"manifest {p.dtype}{list(p.shape)}", part))
                continue
            for e0 in range(0, E, batch):
                e1 = min(E, e0 + batch)         # TensorStore refuses a slice past the end (numpy would clip it)
                try:
                    a = arr[e0:e1].read().result()
                except Exception as e:
                    report.problems.append(Problem(r.name, f"experts {e0}..{e1 - 1} unreadable ({e})", part))
                    continue
                for j in range(a.shape[0]):
                    got = checksum(a[j])
                    if got != p.crc32[e0 + j]:
                        report.problems.append(Problem(r.name, f"crc32 {got} != manifest {p.crc32[e0 + j]} "
                                                               f"(in {sf})", part, e0 + j))
                report.bytes += a.nbytes


def verify(path: str | os.PathLike, *, expert_batch: int = 8) -> VerifyReport:
    """Check every file, tensor and expert of a store against its manifest.

    Returns a VerifyReport (`.ok`, `.problems`, `.warnings`, `.summary()`); raises StoreError only when the directory
    is not a readable store at all (no manifest, or one that is unreadable or fails its own checksum:
    StoreCorruptError).

    Example:
        >>> rep = verify("/nvme/v3-nvfp4"); print(rep.summary())
    """
    path = os.fspath(path)
    m = read_manifest(path)         # refuses a manifest whose own checksum does not match (edited or damaged)
    report = VerifyReport(path)
    if not m.sealed:
        report.warnings.append(f"{MANIFEST_FILE} has no {MANIFEST_CHECKSUM} (written by a dsjax before manifests "
                               "carried their own checksum): an edit to it, e.g. to its model config, cannot be "
                               "detected; re-convert the store to add one")
    _check_files(path, m, report)
    _check_core(path, m, report)
    _check_experts(path, m, report, expert_batch)
    return report


def verify_or_raise(path: str | os.PathLike) -> VerifyReport:
    rep = verify(path)
    if not rep.ok:
        raise StoreError(rep.summary())
    return rep
