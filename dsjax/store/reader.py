"""Reading a dsjax store: the core straight into a memory kind (orbax), routed experts asynchronously (TensorStore).

    store = Store("/nvme/v3-nvfp4")
    core = store.read_core(memory_kind="pinned_host")     # weight pytree without routed experts, on the device
    futs = store.read_experts(3, [5, 17, 200])            # {"gate": Future[{"packed", "scales", "global_scale"}], ...}
    weights = store.load_weights(jnp.bfloat16)            # everything, as dsjax.model uses it (all-in-memory path)

Owns opening the arrays, bounded I/O concurrency (one TensorStore context per Store: `file_io_concurrency` caps the
preads in flight, `cache_pool` 0 keeps TensorStore from holding a second copy) and checking bytes on read: every
expert read is compared with its CRC-32 from the manifest, every core tensor after restore (verify=True). Does not
own placement policy or caching: the runtime decides what to read, when, and into which buffers.
"""

# E experts, k experts requested, N out-features, K in-features

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.weights import F32_KEYS
from dsjax.quant import QTensor
from dsjax.store.manifest import (
    MANIFEST_FILE, PLAIN_PART, StoreCorruptError, StoreError, TensorRecord, checksum, np_dtype, read_manifest,
)
from dsjax.store.zarr_shard import shard_file, tensorstore_spec

PROJECTIONS = ("gate", "up", "down")


def _damaged(store: str, what: str, detail: str) -> StoreCorruptError:
    return StoreCorruptError(f"{store}: {what}: {detail}; the store is damaged: run `dsjax verify {store}` for a full "
                             "report, then re-convert (or restore the store from a copy)")


def orbax_restore(path: str, abstract: dict, shardings: dict | None) -> dict:
    """Restore (part of) an orbax core checkpoint; leaves come back on `shardings` (jax.Arrays) or as numpy."""
    import orbax.checkpoint as ocp
    if shardings is None:
        rargs = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    else:
        rargs = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
    return ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=True, use_compression=False).restore(
        os.path.abspath(path), args=ocp.args.PyTreeRestore(item=abstract, restore_args=rargs, partial_restore=True))


def read_core_direct(path: str, records: list[TensorRecord]):
    """Yield (record, {part: np.ndarray} or None, error or None) for each core tensor, reading each array with
    TensorStore where orbax's own metadata says it lives. Used to name the tensor at fault when an orbax restore
    of a unit fails (orbax reports only a file path, and after one failure abandons the unit)."""
    import orbax.checkpoint as ocp
    import tensorstore as ts
    try:
        meta = ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=True).metadata(
            os.path.abspath(path)).item_metadata.tree
    except Exception as e:
        for r in records:
            yield r, None, f"checkpoint metadata in {path} unreadable ({e})"
        return
    for r in records:
        node = meta.get(core_key(r))
        if node is None:
            yield r, None, f"not in the orbax checkpoint {path}"
            continue
        parts, err = {}, None
        for part, am in (node.items() if r.is_fp4 else [(PLAIN_PART, node)]):
            try:
                spec = tensorstore_spec(os.path.join(str(am.directory), am.name))
                parts[part] = ts.open(spec, read=True, open=True).result().read().result()
            except Exception as e:
                err = f"part {part} cannot be read ({e})"
                break
        yield r, (None if err else parts), err


def core_key(rec: TensorRecord) -> str:
    """The key of a core tensor inside its unit's orbax tree ('layers.3.q_a' -> 'q_a')."""
    return rec.name.rsplit(".", 1)[-1]


def abstract_tree(records: Iterable[TensorRecord], sharding=None) -> dict:
    """ShapeDtypeStructs of core records: FP4 tensors as {packed, scales, global_scale}, plain tensors as leaves."""
    def sds(p):
        return jax.ShapeDtypeStruct(p.shape, np_dtype(p.dtype), sharding=sharding)
    out = {}
    for r in records:
        out[core_key(r)] = {k: sds(p) for k, p in r.parts.items()} if r.is_fp4 else sds(r.parts[PLAIN_PART])
    return out


def check_parts(store: str, rec: TensorRecord, parts: dict[str, Any]) -> None:
    """Compare restored parts (numpy or jax) with the record's shapes, dtypes and CRC-32s."""
    for name, p in rec.parts.items():
        a = np.asarray(parts[name])
        if tuple(a.shape) != tuple(p.shape) or a.dtype.name != p.dtype:
            raise _damaged(store, f"tensor {rec.name} ({rec.hf_name}) part {name}",
                           f"stored {a.dtype.name}{list(a.shape)} but the manifest says {p.dtype}{list(p.shape)}")
        got = checksum(a)
        if got != p.crc32:
            raise _damaged(store, f"tensor {rec.name} ({rec.hf_name}) part {name} in {rec.path}",
                           f"crc32 {got} != manifest {p.crc32}")


class Store:
    """An open dsjax store (see dsjax/store/writer.py for the layout).

    Args:
        path: the store directory.
        io_concurrency: preads in flight at most (TensorStore `file_io_concurrency`); 32-128 suits NVMe queues.
        copy_concurrency: TensorStore decode/copy threads (`data_copy_concurrency`).
        threads: Python threads that wait on reads and check checksums (zlib.crc32 releases the GIL).

    Example:
        >>> with Store("/nvme/v3-nvfp4") as s:
        ...     bufs = s.read_experts(3, [5, 17])["gate"].result()     # packed [2, N, K/2], scales, global_scale [2]
    """

    def __init__(self, path: str | os.PathLike, *, io_concurrency: int = 64, copy_concurrency: int = 8,
                 threads: int = 4):
        import tensorstore as ts
        self.path = os.fspath(path)
        self.manifest = read_manifest(self.path)
        self.config = ModelConfig.from_dict(self.manifest.model_config,
                                            source=os.path.join(self.path, MANIFEST_FILE))
        self.fmt = self.manifest.fmt
        self.io_concurrency = int(io_concurrency)
        self.ts_context = ts.Context({"file_io_concurrency": {"limit": self.io_concurrency},
                                      "data_copy_concurrency": {"limit": int(copy_concurrency)},
                                      "cache_pool": {"total_bytes_limit": 0}})
        self._arrays: dict[tuple[int, str, str], Any] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dsjax-store-read")

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # ---- records ---------------------------------------------------------------------------------
    def record(self, name: str) -> TensorRecord:
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise StoreError(f"{self.path}: the manifest has no tensor {name!r}") from None

    def core_units(self) -> list[str]:
        return list(dict.fromkeys(r.unit for r in self.manifest.tensors.values() if r.tier == "core"))

    def expert_record(self, layer: int, proj: str) -> TensorRecord:
        if proj not in PROJECTIONS:
            raise ValueError(f"projection {proj!r} is not one of {PROJECTIONS}")
        if not self.config.is_moe_layer(layer):
            raise StoreError(f"{self.path}: layer {layer} is not an MoE layer (kinds: {self.config.layer_kinds})")
        return self.record(f"layers.{layer}.experts_{proj}")

    # ---- core --------------------------------------------------------------------------------------
    def _sharding(self, memory_kind: str | None, device=None):
        dev = device if device is not None else jax.devices()[0]
        kinds = [m.kind for m in dev.addressable_memories()]
        kind = memory_kind or dev.default_memory().kind
        if kind not in kinds:
            raise ValueError(f"memory_kind {memory_kind!r} is not available on {dev}; choose one of {kinds}")
        return jax.sharding.SingleDeviceSharding(dev, memory_kind=kind)

    def read_core_unit(self, unit: str, memory_kind: str | None = None, *, verify: bool = True,
                       device=None) -> dict[str, Any]:
        """One core unit ('embed', 'layer_003', 'head') as {key: jax.Array | QTensor}, restored by orbax straight
        into `memory_kind` ('device', 'pinned_host'; None = the device's default) of `device` (None: the first)."""
        records = [r for r in self.manifest.tensors.values() if r.unit == unit and r.tier == "core"]
        if not records:
            raise StoreError(f"{self.path}: no core unit {unit!r} (units: {', '.join(self.core_units())})")
        sharding = self._sharding(memory_kind, device)
        abstract = abstract_tree(records, sharding)
        path = os.path.join(self.path, records[0].path)
        try:
            tree = orbax_restore(path, abstract, jax.tree.map(lambda s: s.sharding, abstract))
        except Exception as e:  # orbax/TensorStore raise ValueError/FileNotFoundError/...: find the tensor at fault
            for r, _, err in read_core_direct(path, records):
                if err:
                    raise _damaged(self.path, f"tensor {r.name} ({r.hf_name}) in {r.path}",
                                   f"cannot be restored: {err}") from None
            raise _damaged(self.path, f"core unit {unit} ({records[0].path})", f"cannot be restored ({e})") from None
        out = {}
        for r in records:
            leaf = tree[core_key(r)]
            if verify:
                check_parts(self.path, r, leaf if r.is_fp4 else {PLAIN_PART: leaf})
            out[core_key(r)] = QTensor(**leaf, fmt=r.dtype) if r.is_fp4 else leaf
        return out

    def read_core(self, memory_kind: str | None = None, *, verify: bool = True, device=None) -> dict:
        """The weight pytree without routed experts: {'embed', 'final_norm', 'lm_head', 'layers': [dict, ...]};
        FP4 tensors are QTensors. Leaves live on `device` (None: the first) in `memory_kind`."""
        out: dict[str, Any] = {}
        layers = []
        for unit in self.core_units():
            part = self.read_core_unit(unit, memory_kind, verify=verify, device=device)
            if unit.startswith("layer_"):
                layers.append(part)
            else:
                out.update(part)
        out["layers"] = layers
        return out

    # ---- experts -----------------------------------------------------------------------------------
    def _array(self, rec: TensorRecord, part: str):
        key = (rec.name, part)
        with self._lock:
            arr = self._arrays.get(key)
            if arr is None:
                import tensorstore as ts
                path = os.path.join(self.path, rec.path, part)
                try:
                    arr = ts.open(tensorstore_spec(path), context=self.ts_context, read=True, open=True).result()
                except Exception as e:
                    raise _damaged(self.path, f"routed experts {rec.name} part {part} ({path})",
                                   f"cannot be opened ({e})") from None
                p = rec.parts[part]
                if tuple(arr.shape) != tuple(p.shape) or arr.dtype.numpy_dtype.name != p.dtype:
                    raise _damaged(self.path, f"routed experts {rec.name} part {part}",
                                   f"array is {arr.dtype.numpy_dtype.name}{list(arr.shape)}, manifest says "
                                   f"{p.dtype}{list(p.shape)}")
                self._arrays[key] = arr
            return arr

    def read_experts(self, layer: int, expert_ids, out: dict | None = None, *,
                     projections: Iterable[str] = PROJECTIONS, verify: bool = True) -> dict[str, Future]:
        """Start reading experts `expert_ids` of an MoE layer; returns {proj: Future[{part: np.ndarray [k, ...]}]}.

        Parts are 'packed' [k, N, K/2] uint8, 'scales' [k, N, K/bs] uint8 and 'global_scale' [k] float32 for FP4
        projections ('weight' [k, N, K] bfloat16 for a projection stored plain), in the order of `expert_ids`.
        Reads are issued at once and run concurrently, at most `io_concurrency` preads in flight for the Store.

        Args:
            out: optional caller buffers {proj: {part: array}} of exactly those shapes and dtypes (C-contiguous,
                writable, e.g. recycled page-aligned or pinned staging buffers): filled in place and returned.
            verify: compare every expert's bytes with its CRC-32 (StoreCorruptError names the tensor and expert).
        """
        import tensorstore as ts
        ids = np.asarray(list(expert_ids) if not isinstance(expert_ids, np.ndarray) else expert_ids,
                         np.int64).reshape(-1)
        futures: dict[str, Future] = {}
        for proj in projections:
            rec = self.expert_record(layer, proj)
            E = rec.shape[0]
            if ids.size and (ids.min() < 0 or ids.max() >= E):
                raise IndexError(f"expert ids {ids.tolist()} outside [0, {E}) for {rec.name}")
            bufs, pending = {}, {}
            for part, p in rec.parts.items():
                shape = (ids.size,) + tuple(p.shape[1:])
                buf = self._caller_buffer(out, proj, part, shape, np_dtype(p.dtype))
                if ids.size:
                    src = self._array(rec, part)[ids]
                    pending[part] = ts.array(buf, copy=False, write=True).write(src)
                bufs[part] = buf
            futures[proj] = self._pool.submit(self._finish, rec, ids, bufs, pending, verify)
        return futures

    @staticmethod
    def _caller_buffer(out, proj, part, shape, dtype) -> np.ndarray:
        if out is None:
            return np.empty(shape, dtype)
        try:
            buf = out[proj][part]
        except KeyError:
            raise ValueError(f"out is missing a buffer for {proj}/{part} ({dtype.name}{list(shape)})") from None
        if (not isinstance(buf, np.ndarray) or buf.shape != shape or buf.dtype != dtype
                or not buf.flags.c_contiguous or not buf.flags.writeable):
            got = f"{buf.dtype.name}{list(buf.shape)}" if isinstance(buf, np.ndarray) else type(buf).__name__
            raise ValueError(f"out[{proj!r}][{part!r}] must be a writable C-contiguous {dtype.name}{list(shape)} "
                             f"array, got {got}")
        return buf

    def _finish(self, rec: TensorRecord, ids: np.ndarray, bufs: dict, pending: dict, verify: bool) -> dict:
        for part, fut in pending.items():
            try:
                fut.result()
            except Exception as e:
                path = shard_file(os.path.join(self.path, rec.path, part), len(rec.parts[part].shape))
                raise _damaged(self.path, f"routed experts {rec.name} ({rec.hf_name}) part {part} in {path}",
                               f"read failed ({e})") from None
        if verify:
            for part, p in rec.parts.items():
                for j, e in enumerate(ids.tolist()):
                    got = checksum(bufs[part][j])
                    if got != p.crc32[e]:
                        hf = rec.hf_name.replace("*", str(e))
                        raise _damaged(self.path, f"routed expert {e} of {rec.name} ({hf}) part {part}",
                                       f"crc32 {got} != manifest {p.crc32[e]}")
        return bufs

    # ---- everything --------------------------------------------------------------------------------
    def load_weights(self, dtype=jnp.bfloat16, memory_kind: str | None = None, *, verify: bool = True,
                     progress: bool = False, device=None) -> dict:
        """The full weight pytree as dsjax.model uses it: plain tensors cast to `dtype` (routers float32), FP4
        tensors as QTensor, routed experts stacked [E, N, K] (QTensor, or `dtype` when stored plain), on `device`
        (None: the first). The one whole-model loader of a store (dsjax.load(..., in_memory=True) uses it)."""
        from tqdm.auto import tqdm
        sharding = self._sharding(memory_kind, device)
        weights = self.read_core(memory_kind, verify=verify, device=device)

        def cast(key, a):
            return a if isinstance(a, QTensor) or key in F32_KEYS else a.astype(dtype)

        for k in ("embed", "final_norm", "lm_head"):
            weights[k] = cast(k, weights[k])
        for i, lw in enumerate(tqdm(weights["layers"], desc="loading layers", unit="layer", disable=not progress)):
            for k in list(lw):
                lw[k] = cast(k, lw[k])
            if not self.config.is_moe_layer(i):
                continue
            futs = self.read_experts(i, range(self.config.n_routed_experts), verify=verify)
            for proj, fut in futs.items():
                rec, parts = self.expert_record(i, proj), fut.result()
                put = {p: jax.device_put(a, sharding) for p, a in parts.items()}
                lw[f"experts_{proj}"] = QTensor(**put, fmt=rec.dtype) if rec.is_fp4 else put[PLAIN_PART].astype(dtype)
        return weights
