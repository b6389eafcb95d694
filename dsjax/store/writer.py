"""Streaming, resumable conversion of a Hugging Face DeepSeek checkpoint into a dsjax FP4 store (`dsjax convert`).

Store layout (read by reader.py, checked by verify.py):

    manifest.json           written LAST by atomic rename: the mark of a complete store (schema: manifest.py)
    config.json, tokenizer.json, tokenizer_config.json, generation_config.json   copied, checksummed (self-contained)
    core/embed/             orbax PyTree checkpoints (zarr3, uncompressed), one per unit:
    core/layer_000/ ...       a layer's tensors except routed experts; FP4 ones as {packed, scales, global_scale}
    core/head/                final_norm + lm_head
    experts/layer_001/{gate,up,down}/{packed,scales,global_scale}   zarr3 [E, ...], one shard file per array, one
                            chunk per expert (zarr_shard.py); `weight` instead when a projection stays bf16
    progress/               only while converting: conversion.json (the job's identity) + one record per done unit

Units are the steps of conversion and of resuming: `embed`, each layer's core (`layer_003`), each layer-projection's
experts (`layer_003.gate`), `head`. A unit is written, then its record goes to progress/<unit>.json (atomic); a
restarted run skips recorded units and rewrites any other unit from scratch, so half-written files are never trusted.
Every byte written is a pure function of (source, format, policy): orbax's two time-stamped files are normalized
(`_save_orbax`), so a resumed conversion produces the same files, byte for byte, as an uninterrupted one.

Parallelism: `workers` threads (numpy, zlib.crc32 and file writes release the GIL) convert a unit's tensors, or a
unit's experts, while the calling thread takes their results in order: experts are appended to the shard and
checksums recorded in expert order, so the store and manifest are byte-identical for any `workers` (workers=1 runs
everything on the calling thread). At most 2 x workers results are held, done or in flight.

Peak memory (anonymous, excluding the source's memory-mapped pages, which the kernel can drop) is bounded by
    (largest core unit as stored) + workers x 6 x min(band_bytes, largest quantized matrix in float32)
                                  + 2 x workers x (one routed expert matrix as stored) + 256 MB
The first term is the one unit orbax writes at a time, e.g. the bf16 embedding (V3: 1.85 GB) or a dense layer's
attention + MLP (orbax's defensive copy is turned off, `_save_orbax`; an orbax without that switch, e.g. 0.12.4 on
the GPU machine, copies the unit: count this term twice there). Each worker quantizes one matrix at a time, a routed
expert's (V3: 59 MB in float32) or a band of `band_bytes` (64 MiB) of float32 rows of a larger tensor, with up to 6x
that in temporaries; converted experts wait in a window of 2 x workers (V3: 8.3 MB each in NVFP4). A synthetic
source generates straight into the stored format, within the same terms. FP8-block tensors are dequantized whole
(V3's largest, a dense MLP matrix, is 0.53 GB in float32), one per worker. The last term is an allowance for
TensorStore/orbax buffers and thread arenas (~0.1 GB measured on 16 cores). The number of layers or experts never
enters (bench/convert.py measures the peak for two input sizes and each worker count: bench/RESULTS_convert.md).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import glob
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from dsjax.model.weights import F32_KEYS, layer_shapes
from dsjax.quant import BLOCK_SIZES, QTensor, dequantize_np, quantize
from dsjax.store import policy as policy_lib
from dsjax.store.manifest import (
    MANIFEST_FILE, PLAIN_PART, Manifest, PartRecord, StoreError, TensorRecord, checksum,
    conversion_identity, looks_like_store, read_manifest, write_json_atomic,
)
from dsjax.store.safetensors_io import CheckpointError
from dsjax.store.source import Ref, Source
from dsjax.store.zarr_shard import ShardWriter, create_array

PROJECTIONS = {"experts_gate": "gate", "experts_up": "up", "experts_down": "down"}
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
PROGRESS = "progress"
JOB_FILE = "conversion.json"
# Everything a store directory may hold (DSJAX_SOURCE: dsjax.demo's stamp of the checkpoint it was made from).
STORE_PARTS = {MANIFEST_FILE, MANIFEST_FILE + ".tmp", PROGRESS, "core", "experts", "DSJAX_SOURCE", *COPIED_FILES,
               *(f + ".tmp" for f in COPIED_FILES)}
DEFAULT_BAND_BYTES = 64 << 20
T, R = TypeVar("T"), TypeVar("R")


def default_workers() -> int:
    """Threads for conversion and generation: one per core, at most 16. On the 16-core GPU machine quantizing a bf16
    checkpoint still gains from 8 to 16 (bench/RESULTS_convert.md); memory grows with it (module docstring)."""
    return max(1, min(16, os.cpu_count() or 1))


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn(item) for each item, yielded in order, computed on `workers` threads with at most 2 x workers results held
    (done or in flight). workers <= 1: computed on the calling thread. An exception in fn is raised at its item;
    closing the iterator early cancels what has not started and waits for what has.

    Example:
        >>> with contextlib.closing(map_ordered(convert_expert, range(E), 8)) as results:
        ...     for r in results: append(r)
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="dsjax-convert") as pool:
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
                pending.append(pool.submit(fn, item))
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


@dataclasses.dataclass(frozen=True)
class Unit:
    """One step of conversion: a core orbax checkpoint or one layer-projection of routed experts."""

    name: str                   # "embed", "layer_003", "layer_003.gate", "head"
    path: str                   # relative to the store
    keys: tuple[str, ...]       # weight keys (dsjax/model/weights.py)
    layer: int | None = None

    @property
    def tier(self) -> str:
        return "experts" if self.path.startswith("experts/") else "core"


def plan_units(cfg) -> list[Unit]:
    units = [Unit("embed", "core/embed", ("embed",))]
    for i in range(cfg.num_hidden_layers):
        keys = tuple(layer_shapes(cfg, i))
        units.append(Unit(f"layer_{i:03d}", f"core/layer_{i:03d}", tuple(k for k in keys if k not in PROJECTIONS), i))
        units += [Unit(f"layer_{i:03d}.{PROJECTIONS[k]}", f"experts/layer_{i:03d}/{PROJECTIONS[k]}", (k,), i)
                  for k in keys if k in PROJECTIONS]
    return units + [Unit("head", "core/head", ("final_norm", "lm_head"))]


def tensor_name(key: str, layer: int | None) -> str:
    return key if layer is None else f"layers.{layer}.{key}"


def store_dtype(key: str) -> np.dtype:
    """Plain (non-FP4) tensors are stored in bf16; routers and their bias in float32 (weights.F32_KEYS)."""
    return np.dtype(np.float32) if key in F32_KEYS else np.dtype(ml_dtypes.bfloat16)


def quantize_banded(w: np.ndarray, fmt: str, band_bytes: int = DEFAULT_BAND_BYTES) -> QTensor:
    """`quantize(w, fmt)` of a 2-D weight, bit for bit, holding only `band_bytes` of float32 rows at a time.

    MXFP4 rows are independent. NVFP4's per-matrix scale depends on amax(W): a first pass finds it, and each band is
    quantized with one extra row holding that amax, so `quantize` derives the same global scale for every band
    (rows never influence each other's codes or block scales); the extra row's output is dropped.
    """
    n, k = w.shape
    rows = max(1, band_bytes // (4 * k))
    if n <= rows:
        return quantize(np.asarray(w, np.float32), fmt)
    extra = None
    if fmt == "nvfp4":
        amax = max(np.max(np.abs(np.asarray(w[r:r + rows], np.float32))) for r in range(0, n, rows))
        extra = np.zeros((1, k), np.float32)
        extra[0, 0] = amax
    packed = np.empty((n, k // 2), np.uint8)
    scales = np.empty((n, k // BLOCK_SIZES[fmt]), np.uint8)
    for r in range(0, n, rows):
        band = np.asarray(w[r:r + rows], np.float32)
        m = band.shape[0]
        q = quantize(band if extra is None else np.concatenate([band, extra]), fmt)
        packed[r:r + m], scales[r:r + m] = q.packed[:m], q.scales[:m]
    return QTensor(packed=packed, scales=scales, global_scale=q.global_scale, fmt=fmt)


def _parts(value) -> dict[str, np.ndarray]:
    if isinstance(value, QTensor):
        return {"packed": value.packed, "scales": value.scales,
                "global_scale": np.asarray(value.global_scale, np.float32)}
    return {PLAIN_PART: value}


class _Job:
    """One conversion: the source, the destination, the format and policy, and how each tensor is converted."""

    def __init__(self, source: Source, dst: str, fmt: str, policy: str, band_bytes: int, workers: int = 1):
        self.source, self.dst, self.fmt, self.policy, self.band_bytes = source, dst, fmt, policy, band_bytes
        self.workers = workers

    def ref(self, u: Unit, key: str, expert: int | None = None) -> Ref:
        if u.layer is None:
            return self.source.global_ref(key)
        if expert is not None:
            return self.source.expert_ref(u.layer, key, expert)
        return self.source.layer_ref(u.layer, key)

    def _n_experts(self, u: Unit) -> int:
        return layer_shapes(self.source.cfg, u.layer)[u.keys[0]][0]

    def stores_fp4(self, key: str, ref: Ref) -> tuple[bool, str | None]:
        """(FP4?, note). NVFP4 input going into an nvfp4 store stays FP4 bit for bit whatever the policy: expanding it
        to bf16 would cost bytes and gain no accuracy (the information is already gone)."""
        d = policy_lib.decide(key, ref.shape, self.fmt, self.policy)
        if self.fmt == "nvfp4" and self.source.is_nvfp4(ref.name):
            return True, None if d.fp4 else f"kept NVFP4 bit for bit from the source (policy {self.policy} " \
                                            "would store bf16)"
        return d.fp4, d.note

    def convert(self, key: str, ref: Ref, fp4: bool) -> QTensor | np.ndarray:
        raw = self.source.read(ref)
        if isinstance(raw, QTensor):
            if fp4 and self.fmt == "nvfp4":
                return raw
            raw = dequantize_np(raw)        # NVFP4 -> mxfp4 (or bf16): dequantize, then requantize
        if fp4:
            try:
                return quantize_banded(raw, self.fmt, self.band_bytes)
            except ValueError as e:     # e.g. inf/NaN weights: name the tensor, not just a shape
                raise CheckpointError(f"{self.source.path}: tensor {ref.name!r} cannot be quantized: {e}") from None
        return np.asarray(raw).astype(store_dtype(key), copy=False)   # a bf16 source is stored as is

    def source_bytes(self, u: Unit) -> int:
        if u.tier == "core":
            return sum(self.source.ref_bytes(self.ref(u, k)) for k in u.keys)
        return sum(self.source.ref_bytes(self.ref(u, u.keys[0], e)) for e in range(self._n_experts(u)))

    def stored_bytes(self, u: Unit) -> int:
        """Bytes the unit will occupy in the store (for the free-space check)."""
        total = 0
        for key in u.keys:
            ref = self.ref(u, key, 0 if u.tier == "experts" else None)
            shape = layer_shapes(self.source.cfg, u.layer)[key] if u.tier == "experts" else ref.shape
            n = int(np.prod(shape, dtype=np.int64))
            if self.stores_fp4(key, ref)[0]:
                total += n // 2 + n // BLOCK_SIZES[self.fmt] + 4 * int(np.prod(shape[:-2], dtype=np.int64))
            else:
                total += n * store_dtype(key).itemsize
        return total

    # ---- units -----------------------------------------------------------------------------------
    def write_core(self, u: Unit, bar) -> dict[str, TensorRecord]:
        def convert_one(key: str):
            ref = self.ref(u, key)
            fp4, note = self.stores_fp4(key, ref)
            value = self.convert(key, ref, fp4)
            parts = _parts(value)
            record = self._record(u, key, ref, value, note, {p: PartRecord.of(a) for p, a in parts.items()})
            return ref, (parts if isinstance(value, QTensor) else value), record

        tree: dict[str, Any] = {}
        records: dict[str, TensorRecord] = {}
        with contextlib.closing(map_ordered(convert_one, u.keys, self.workers)) as results:
            for key, (ref, stored, record) in zip(u.keys, results):
                tree[key] = stored
                records[record.name] = record
                bar.update(self.source.ref_bytes(ref))
        _save_orbax(os.path.join(self.dst, u.path), tree)
        return records

    def write_experts(self, u: Unit, bar) -> dict[str, TensorRecord]:
        key = u.keys[0]
        E, N, K = layer_shapes(self.source.cfg, u.layer)[key]
        ref0 = self.ref(u, key, 0)
        fp4, note = self.stores_fp4(key, ref0)
        bs = BLOCK_SIZES[self.fmt]
        specs = ({"packed": ((E, N, K // 2), np.uint8), "scales": ((E, N, K // bs), np.uint8),
                  "global_scale": ((E,), np.float32)} if fp4 else {PLAIN_PART: ((E, N, K), store_dtype(key))})
        base = os.path.join(self.dst, u.path)
        writers: dict[str, ShardWriter] = {}
        crcs: dict[str, list[str]] = {p: [] for p in specs}
        try:
            for part, (shape, dtype) in specs.items():
                create_array(os.path.join(base, part), shape, np.dtype(dtype))
                writers[part] = ShardWriter(os.path.join(base, part), shape, np.dtype(dtype))

            def convert_one(e: int):
                ref = self.ref(u, key, e)
                parts = _parts(self.convert(key, ref, fp4))
                return ref, parts, {p: checksum(a) for p, a in parts.items()}

            with contextlib.closing(map_ordered(convert_one, range(E), self.workers)) as results:
                for ref, parts, crc in results:         # expert order, whatever order the workers finish in
                    for part, a in parts.items():
                        writers[part].append(a)
                        crcs[part].append(crc[part])
                    bar.update(self.source.ref_bytes(ref))
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        parts = {p: PartRecord(shape=tuple(s), dtype=np.dtype(d).name,
                               bytes=int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize, crc32=tuple(crcs[p]))
                 for p, (s, d) in specs.items()}
        name = tensor_name(key, u.layer)
        hf = ref0.name if ref0.index is not None else ref0.name.replace(".experts.0.", ".experts.*.")
        return {name: TensorRecord(name=name, hf_name=hf, unit=u.name, tier="experts", path=u.path,
                                   shape=(E, N, K), dtype=self.fmt if fp4 else store_dtype(key).name, parts=parts,
                                   source_dtype=self.source.source_dtype(ref0.name), note=note)}

    def _record(self, u: Unit, key: str, ref: Ref, value, note: str | None, parts) -> TensorRecord:
        name = tensor_name(key, u.layer)
        dtype = value.fmt if isinstance(value, QTensor) else np.dtype(value.dtype).name
        return TensorRecord(name=name, hf_name=ref.name, unit=u.name, tier="core", path=u.path, shape=ref.shape,
                            dtype=dtype, parts=parts, source_dtype=self.source.source_dtype(ref.name), note=note)


def _save_orbax(path: str, tree: dict) -> None:
    """An orbax PyTree checkpoint (zarr3, no OCDBT, no compression) that is a pure function of `tree`.

    Orbax stamps wall-clock times into `_CHECKPOINT_METADATA` and the absolute path into `commit_success.txt` (a
    marker for filesystems without atomic rename; orbax's local-disk restore does not read it). We zero the former
    and drop the latter so identical inputs give identical files, and a store can be moved. Orbax's numpy handler
    deep-copies every array by default (a guard for asynchronous saves); this save is synchronous and nothing
    changes the arrays meanwhile, so we turn that off: the unit is held once, not twice (V3's embedding: 1.85 GB).
    """
    import orbax.checkpoint as ocp
    from absl import logging as absl_logging
    os.makedirs(os.path.dirname(path), exist_ok=True)
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)   # orbax warns about OCDBT merging and jax.Array metadata (unused)
    try:
        try:
            numpy_handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
        except TypeError:       # older orbax (0.12.4) always copies: the unit is held twice while it is saved
            numpy_handler = ocp.type_handlers.NumpyHandler()
        registry = ocp.type_handlers.create_type_handler_registry((np.ndarray, numpy_handler))  # trees: only ndarrays
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True, use_compression=False,
                                              type_handler_registry=registry)
        ocp.Checkpointer(handler).save(os.path.abspath(path), tree)
    finally:
        absl_logging.set_verbosity(level)
    meta = os.path.join(path, "_CHECKPOINT_METADATA")
    if os.path.exists(meta):
        with open(meta) as f:
            m = json.load(f)
        m.update({k: 0 for k in m if k.endswith("timestamp_nsecs")})
        write_json_atomic(meta, m, fsync=False)
    commit = os.path.join(path, "commit_success.txt")
    if os.path.exists(commit):
        os.remove(commit)


# ---- destination, resume, finalize -----------------------------------------------------------------
def _prepare(dst: str, identity: dict[str, Any]) -> str:
    """'new', 'resume' or 'complete'; raises StoreError for anything that is not ours to write into."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise StoreError(f"{dst}: exists and is a file, not a store directory; choose another destination")
    job_file = os.path.join(dst, PROGRESS, JOB_FILE)
    if os.path.isdir(dst):
        entries = sorted(os.listdir(dst))
        if MANIFEST_FILE in entries:
            m = read_manifest(dst)
            if m.identity == identity:
                shutil.rmtree(os.path.join(dst, PROGRESS), ignore_errors=True)
                return "complete"
            raise StoreError(f"{dst}: already holds a complete dsjax store of {m.source.get('name')!r} ({m.fmt}, "
                             f"policy {m.policy}); choose another destination, or delete it to convert again")
        if os.path.exists(job_file):
            try:
                with open(job_file) as f:
                    job = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise StoreError(f"{job_file}: unreadable ({e}); delete {dst} and convert again") from None
            if job != identity:
                raise StoreError(f"{dst}: holds an unfinished conversion of a different job ({job}); resume it with "
                                 f"its own source, format and policy, or delete {dst}")
            return "resume"
        if entries and set(entries) <= STORE_PARTS and looks_like_store(dst):
            # A store's parts without its manifest and job file (a deleted manifest.json, a lost journal): nothing
            # here can be trusted or matched to a job, so convert again from scratch, into the same directory.
            for part in (PROGRESS, "core", "experts"):
                shutil.rmtree(os.path.join(dst, part), ignore_errors=True)
            entries = []
        if entries and entries != [PROGRESS]:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise StoreError(f"{dst}: exists and is not a dsjax store (it holds {shown}); choose a new or empty "
                             "destination directory")
    os.makedirs(os.path.join(dst, PROGRESS), exist_ok=True)
    write_json_atomic(job_file, identity)
    return "new"


def _done_units(dst: str, units: list[Unit]) -> dict[str, dict[str, TensorRecord]]:
    done = {}
    for u in units:
        p = os.path.join(dst, PROGRESS, u.name + ".json")
        if not os.path.exists(p):
            continue
        with open(p) as f:
            d = json.load(f)   # written by atomic rename: complete whenever it exists
        done[u.name] = {k: TensorRecord.from_json(k, r) for k, r in d["tensors"].items()}
    return done


def _clean_unit(dst: str, u: Unit) -> None:
    """Remove whatever an interrupted attempt at this unit left behind (its files are rewritten from scratch)."""
    path = os.path.join(dst, u.path)
    for p in [path] + glob.glob(path + ".orbax-checkpoint-tmp*"):
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _copy_files(src: str, dst: str) -> dict[str, dict[str, Any]]:
    files = {}
    for fn in COPIED_FILES:
        p = os.path.join(src, fn)
        if not os.path.exists(p):
            continue
        with open(p, "rb") as f:
            data = f.read()
        tmp = os.path.join(dst, fn + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(dst, fn))
        files[fn] = {"bytes": len(data), "crc32": checksum(data)}
    return files


def _is_disk_full(e: BaseException) -> bool:
    # TensorStore and orbax report ENOSPC as ValueError text; Python I/O as OSError(errno.ENOSPC).
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _under(filename, dst: str) -> bool:
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return False
    f, d = os.path.abspath(os.fsdecode(filename)), os.path.abspath(dst)
    return f == d or f.startswith(d.rstrip(os.sep) + os.sep)


def _unwritable(dst: str, e: OSError) -> StoreError:
    """One line for an OSError on the destination (read-only filesystem, no permission, a file in the path)."""
    where = "" if e.filename is None or os.path.abspath(os.fsdecode(e.filename)) == os.path.abspath(dst) \
        else f" (at {os.fsdecode(e.filename)})"
    return StoreError(f"{dst}: cannot write the store there: {e.strerror or e}{where}; choose a writable "
                      "destination directory")


def convert(src: "str | os.PathLike | Source", dst: str | os.PathLike, fmt: str = "nvfp4", policy: str = "mlp",
            progress: bool = True, *, on_unit: Callable[[str], None] | None = None,
            band_bytes: int = DEFAULT_BAND_BYTES, workers: int | None = None) -> Manifest:
    """Convert a Hugging Face DeepSeek checkpoint (bf16/fp32, DeepSeek FP8-block or ModelOpt NVFP4) into a store.

    Resumable: re-running the same command after an interruption continues at the first unfinished unit and yields
    the same store as an uninterrupted run. Re-running on a complete store of the same job returns its manifest.

    Args:
        src: checkpoint directory (config.json, *.safetensors, optional tokenizer files and hf_quant_config.json),
            or an opened source with the same interface (dsjax.store.synthetic.SyntheticSource).
        dst: store directory: new, empty, or an unfinished conversion of the same source, format and policy.
        fmt: 'nvfp4' or 'mxfp4'.
        policy: 'experts', 'mlp' (default), 'all' or 'all+lm_head' (dsjax/store/policy.py).
        progress: show a progress bar (bytes of input and MB/s).
        on_unit: called with each unit's name once it is durably recorded (progress hooks, tests).
        band_bytes: float32 rows quantized at once for large tensors (bounds peak memory).
        workers: threads converting tensors and experts (default `default_workers()`: cores, at most 16); the store is
            byte-identical for any value, peak memory grows with it (module docstring).

    Returns:
        The store's Manifest.

    Raises:
        CheckpointError / ConfigError: missing tensors, wrong shapes, unsupported dtypes (named), bad config.
        StoreError: a destination that is not ours or cannot be written (read-only, no permission), a different
            unfinished job there, or a full disk.

    Example:
        >>> convert("DeepSeek-V3", "/nvme/v3-nvfp4", fmt="nvfp4", policy="mlp")
    """
    import dsjax
    policy_lib.check(fmt, policy)
    if hasattr(src, "refs"):            # an opened source (e.g. dsjax.store.synthetic.SyntheticSource)
        source, src, dst = src, src.path, os.fspath(dst)
    else:
        src, dst = os.fspath(src), os.fspath(dst)
        source = Source(src)
    try:
        source.preflight()
        described = source.describe()
        identity = conversion_identity(described["fingerprint"], fmt, policy)
        try:
            state = _prepare(dst, identity)
        except OSError as e:
            raise _unwritable(dst, e) from None
        if state == "complete":
            return read_manifest(dst)
        job = _Job(source, dst, fmt, policy, band_bytes, default_workers() if workers is None else max(1, workers))
        units = plan_units(source.cfg)
        done = _done_units(dst, units)
        todo = [u for u in units if u.name not in done]
        need = sum(job.stored_bytes(u) for u in todo)
        free = shutil.disk_usage(dst).free
        if need > free:
            raise StoreError(f"{dst}: not enough disk space: the rest of the store needs {need / 1e9:.2f} GB, "
                             f"{free / 1e9:.2f} GB are free; free space or choose another destination")
        total = sum(job.source_bytes(u) for u in units)
        initial = total - sum(job.source_bytes(u) for u in todo)
        current = "finalize"
        try:
            with tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1000,
                      desc=f"convert {fmt}/{policy}", disable=not progress, dynamic_ncols=True) as bar:
                for u in todo:
                    current = u.name
                    bar.set_postfix_str(u.name, refresh=False)
                    _clean_unit(dst, u)
                    records = job.write_core(u, bar) if u.tier == "core" else job.write_experts(u, bar)
                    write_json_atomic(os.path.join(dst, PROGRESS, u.name + ".json"),
                                      {"unit": u.name, "tensors": {k: r.to_json() for k, r in records.items()}})
                    done[u.name] = records
                    if on_unit is not None:
                        on_unit(u.name)
            current = "finalize"
            tensors = {k: r for u in units for k, r in done[u.name].items()}
            manifest = Manifest(model_config=source.raw_config, fmt=fmt, block_size=BLOCK_SIZES[fmt], policy=policy,
                                source=described, tensors=tensors, files=_copy_files(src, dst),
                                dsjax_version=dsjax.__version__)
            write_json_atomic(os.path.join(dst, MANIFEST_FILE), manifest.to_json())
        except (OSError, ValueError) as e:
            if _is_disk_full(e):
                raise StoreError(
                    f"{dst}: disk full (no space left on device) while writing {current}; "
                    f"{shutil.disk_usage(dst).free / 1e9:.2f} GB free. Free space and re-run the same command: the "
                    f"conversion resumes at {current}") from e
            if isinstance(e, OSError) and _under(e.filename, dst):
                raise _unwritable(dst, e) from None
            raise
        shutil.rmtree(os.path.join(dst, PROGRESS), ignore_errors=True)
        return manifest
    finally:
        source.close()
