"""ExpertLayout: one routed expert as one contiguous uint8 buffer, the unit the host cache and the GPU slots hold.

An expert is a pytree {proj: QTensor | array} of up to 9 arrays (gate/up/down x packed/scales/global_scale). Moving
it as one buffer makes a load of n experts one `jax.device_put` of n arrays and one slot write with n leaves, instead
of 9n of each (at batch 8 on an H200, ~40 experts cross per MoE layer, and the GPU sat idle ~55% of a decode step,
consistent with per-array host overhead).

Every part (proj, field) sits at a fixed offset, aligned to ALIGN bytes, and the layout is the same for every routed
expert of a store (all of them share shapes and formats). `flatten` packs experts read from the store into buffers
on the host (loader threads); `unflatten` rebuilds the pytree from buffers inside a jitted call by slicing and
bitcasting, bit for bit. Nothing here places arrays or reads files.
"""

# k experts, ... leading axes (experts or GPU slots)

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.quant import QTensor
from dsjax.store.manifest import PLAIN_PART, np_dtype
from dsjax.store.reader import PROJECTIONS as PROJ

ALIGN = 256        # every part starts on a 256-byte boundary (CUDA's allocation alignment), as would its own buffer


@dataclasses.dataclass(frozen=True)
class Part:
    """One array of an expert inside its buffer: bytes [offset, offset + nbytes) hold `dtype` `shape` in C order."""

    proj: str
    field: str                  # a QTensor field ('packed', 'scales', 'global_scale'), or 'weight' for a plain proj
    offset: int
    shape: tuple[int, ...]
    dtype: str                  # numpy dtype name, as in the store's manifest

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np_dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """Where each part of a routed expert sits in its buffer. Frozen and hashable: a static argument of jitted calls.

    Example:
        >>> layout = ExpertLayout.of_store(store, layer=3)
        >>> read = {proj: f.result() for proj, f in store.read_experts(3, [0, 5]).items()}
        >>> rows = flatten(read, layout)                                   # uint8 [2, layout.nbytes]
        >>> unflatten(jnp.asarray(rows), layout)["gate"].packed.shape      # (2, N, K/2)
    """

    parts: tuple[Part, ...]
    fmts: tuple[tuple[str, str | None], ...]    # (proj, 'nvfp4' | 'mxfp4'), or (proj, None) for a plain projection
    nbytes: int                                 # the buffer: every part and its padding, a multiple of ALIGN

    @classmethod
    def of_store(cls, store, layer: int) -> "ExpertLayout":
        """The layout of the routed experts of MoE layer `layer` (the same for every MoE layer of a DeepSeek model)."""
        parts, fmts, offset = [], [], 0
        for proj in PROJ:
            rec = store.expert_record(layer, proj)
            fmts.append((proj, rec.dtype if rec.is_fp4 else None))
            for field, p in rec.parts.items():
                part = Part(proj, field, offset, tuple(p.shape[1:]), p.dtype)    # one expert: no leading axis
                parts.append(part)
                offset += -(-part.nbytes // ALIGN) * ALIGN
        return cls(tuple(parts), tuple(fmts), offset)


def flatten(parts: dict[str, dict[str, np.ndarray]], layout: ExpertLayout) -> np.ndarray:
    """One buffer per expert, uint8 [k, layout.nbytes], from experts as the store reads them ({proj: {field: array
    [k, ...]}}): one strided copy per part for all k experts; the padding between parts is zero."""
    first = layout.parts[0]
    k = len(parts[first.proj][first.field])
    out = np.zeros((k, layout.nbytes), np.uint8)
    for p in layout.parts:
        a = np.ascontiguousarray(parts[p.proj][p.field])
        if a.shape[1:] != p.shape or a.dtype != np_dtype(p.dtype):
            raise ValueError(f"expert part {p.proj}/{p.field} is {a.dtype.name}{list(a.shape[1:])}, but the layout "
                             f"says {p.dtype}{list(p.shape)}")
        out[:, p.offset:p.offset + p.nbytes] = a.reshape(k, -1).view(np.uint8)
    return out


def unflatten(rows: jax.Array, layout: ExpertLayout) -> dict[str, Any]:
    """{proj: QTensor | array} of the experts in `rows` uint8 [..., layout.nbytes], leading axes kept (pure jnp).

    Each part is a slice of the bytes reinterpreted with `bitcast_convert_type` (a float32 from its 4 bytes in the
    order numpy's `view` wrote them), so the arrays are bit-identical to the ones `flatten` was given.
    """
    lead = rows.shape[:-1]
    fields: dict[str, dict[str, jax.Array]] = {proj: {} for proj, _ in layout.fmts}
    for p in layout.parts:
        dtype = jnp.dtype(p.dtype)
        raw = rows[..., p.offset:p.offset + p.nbytes]
        if dtype.itemsize > 1:
            raw = raw.reshape(*lead, -1, dtype.itemsize)                # [..., elements, bytes of one element]
        fields[p.proj][p.field] = jax.lax.bitcast_convert_type(raw, dtype).reshape(*lead, *p.shape)
    return {proj: QTensor(**fields[proj], fmt=fmt) if fmt else fields[proj][PLAIN_PART] for proj, fmt in layout.fmts}
