"""Writing a weight pytree as a Hugging Face DeepSeek checkpoint (hub per-expert names, optional shards + index).

Used to make the embedded demo model and test/benchmark checkpoints; writes into a temporary directory and renames
it into place, so a partial checkpoint is never left under the destination name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.weights import F32_KEYS, layer_shapes
from dsjax.store.hf_names import GLOBAL_NAMES, hf_name


def hf_tensors(cfg: ModelConfig, weights: dict, dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
    """HF-named tensors of a numpy weight pytree (experts split per expert; router and bias kept float32)."""
    cast = lambda k, a: np.ascontiguousarray(a.astype(np.float32 if k in F32_KEYS else dtype))  # noqa: E731
    out = {GLOBAL_NAMES[k]: cast(k, weights[k]) for k in GLOBAL_NAMES}
    for i, lw in enumerate(weights["layers"]):
        for k in layer_shapes(cfg, i):
            if k.startswith("experts_"):
                for e in range(lw[k].shape[0]):
                    out[hf_name(k, i, e)] = cast(k, lw[k][e])
            else:
                out[hf_name(k, i)] = cast(k, lw[k])
    return out


def write_hf_checkpoint(dst: str, config: dict[str, Any], tensors: "dict[str, np.ndarray] | Iterable", *,
                        shard_bytes: int | None = None,
                        extra_files: Callable[[str], None] | None = None) -> str:
    """Write config.json and safetensors atomically: one file, or shards of about `shard_bytes` with an index.

    `tensors` is a dict or an iterable of (name, array) pairs; an iterable is consumed shard by shard, so a
    checkpoint larger than memory can be generated (memory ~ one shard).
    """
    from safetensors.numpy import save_file
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    os.chmod(tmp, 0o755)                     # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        shards: list[list[str]] = []
        total = 0
        group: dict[str, np.ndarray] = {}
        size = 0

        def flush():
            fn = f"shard-{len(shards):05d}.safetensors"
            save_file(group, os.path.join(tmp, fn), metadata={"format": "pt"})
            shards.append(list(group))

        for name, a in (tensors.items() if isinstance(tensors, dict) else tensors):
            if shard_bytes and size and size + a.nbytes > shard_bytes:
                flush()
                group, size = {}, 0
            group[name] = a
            size += a.nbytes
            total += a.nbytes
        flush()
        if len(shards) == 1:
            os.replace(os.path.join(tmp, "shard-00000.safetensors"), os.path.join(tmp, "model.safetensors"))
        else:
            weight_map = {}
            for j, names in enumerate(shards):
                fn = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(os.path.join(tmp, f"shard-{j:05d}.safetensors"), os.path.join(tmp, fn))
                weight_map.update({n: fn for n in names})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if extra_files:
            extra_files(tmp)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
