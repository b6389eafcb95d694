"""`dsjax.load`: from a checkpoint directory to a ready Engine, reading tensors lazily one at a time."""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dsjax.config import ModelConfig
from dsjax.model.attention import MlaForm
from dsjax.runtime.engine import Engine
from dsjax.runtime.tokenizer import Tokenizer
from dsjax.store.hf_names import read_global, read_layer
from dsjax.store.manifest import MANIFEST_FILE, StoreError, looks_like_store, unfinished_store_message
from dsjax.store.safetensors_io import Checkpoint

DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32}


def _dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use 'bfloat16' or 'float32'")
        return np.dtype(DTYPES[dtype])
    d = np.dtype(dtype)
    if d not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float32)):
        raise ValueError(f"dtype={d} is not supported; use 'bfloat16' or 'float32'")
    return d


def _load_tiered(path: str, dt, preset, gpu_memory, host_memory, links, prefill_form, overrides: dict,
                 devices: list | None = None) -> Engine:
    """A store on the tiered runtime (one device, or `devices`: tiered expert parallelism)."""
    from dsjax.runtime.memory import cap_pinned_host
    from dsjax.runtime.tiered import TieredEngine, planned_pinned_bytes
    from dsjax.store.reader import Store
    tok = Tokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    name = os.path.basename(os.path.normpath(path))
    overrides, popularity = _split_popularity(overrides)
    runtime = _runtime_config(preset, gpu_memory, host_memory, overrides)
    store = Store(path)
    if devices is None:          # the first engine of the process caps JAX's pinned pool near what its plan pins
        cap_pinned_host(planned_pinned_bytes(store, runtime, dt))
    return TieredEngine(store, runtime, dt, tok, prefill_form=prefill_form, name=name, links=links,
                        popularity=popularity, devices=devices)


def _split_popularity(overrides: dict) -> tuple[dict, Any]:
    """(the runtime overrides, with `popularity` kept only as a file path: a config key; the popularity counts given
    instead, which go to the engine, or None)."""
    overrides = dict(overrides)
    popularity = overrides.pop("popularity", None)
    if isinstance(popularity, (str, os.PathLike)):
        overrides["popularity"], popularity = os.fspath(popularity), None
    return overrides, popularity


def _runtime_config(preset, gpu_memory, host_memory, overrides: dict):
    from dsjax.runtime.config import RuntimeConfig
    budgets = {k: v for k, v in (("gpu_memory", gpu_memory), ("host_memory", host_memory)) if v is not None}
    return (RuntimeConfig.from_preset(preset, **budgets, **overrides) if preset
            else RuntimeConfig.from_dict({}, **budgets, **overrides))


def pinned_need(path: str | os.PathLike, dtype: str = "bfloat16", *, preset: str | None = None, gpu_memory=None,
                host_memory=None, **overrides) -> int:
    """The host bytes a one-device tiered engine of dsjax.load(path, dtype, ...) with these arguments pins at most at
    once (its plan's pinned_host_peak), without touching a device: for callers that start JAX's backends before they
    load (dsjax bench measures the links first) and cap the pinned pool themselves (memory.cap_pinned_host), as load
    does."""
    from dsjax.runtime.tiered import planned_pinned_bytes
    from dsjax.store.reader import Store
    runtime = _runtime_config(preset, gpu_memory, host_memory, _split_popularity(overrides)[0])
    return planned_pinned_bytes(Store(os.fspath(path)), runtime, _dtype(dtype))


def load(path: str | os.PathLike, dtype: str = "bfloat16", *, preset: str | None = None,
         gpu_memory: int | str | None = None, host_memory: int | str | None = None, prefill_form: MlaForm = "naive",
         progress: bool | None = None, in_memory: bool = False, links=None, devices=None, **overrides) -> Engine:
    """Load a dsjax store (manifest.json; made by `dsjax convert`) or a Hugging Face DeepSeek checkpoint directory
    (config.json, *.safetensors, tokenizer.json) for inference.

    A store runs on the tiered runtime: weights spread over the GPU, pinned host memory and the disk under the
    budgets (`gpu_memory`, `host_memory`: bytes or "16GB"; None = no limit) and a preset of configs/
    ("low_latency", "high_throughput", "balanced"; its budgets apply unless given here), with any memory_config or
    compute_config key as a keyword override; `in_memory=True` puts the whole store on the GPU as one plain model
    instead (no tiers: the all-in-HBM reference; FP4 weights through the fused kernels unless enable_fusion=False).
    `links` (planner.Links) are the link ceilings the placement plan and `stats()["predicted_tok_s"]` use (default:
    measured at load when compute_config.auto_tune, else the product's target box). A Hugging Face checkpoint is
    read tensor by tensor onto the device. `devices` (N, a list of jax devices, or a Mesh with an `expert` axis):
    every weight resident, routed experts split over the devices (expert parallelism, runtime/parallel.py);
    `gpu_memory` then applies to each device (a budget that cannot hold a device's share raises NotImplementedError:
    tiered expert parallelism is not built yet), presets and tiered runtime options do not combine with it. `active_experts=k` (memory_config.active_experts) routes each token to the top k of the
    model's num_experts_per_tok experts, renormalised as the model does (fewer expert bytes per token, at a quality
    cost: bench/RESULTS.md); it applies to every kind of engine, Hugging Face checkpoints and in_memory included.
    `hot_experts=N` (memory_config.hot_experts) keeps the N most popular experts of each MoE layer in GPU slots for the
    engine's life, chosen by `popularity`: the path of a file written by `engine.save_popularity(path)`, or counts
    ([n_layers, E], [E] or {layer: [E]}; e.g. another engine's stats()["expert_activations"]).

    Example:
        >>> engine = dsjax.load("v3-nvfp4-store", preset="balanced", gpu_memory="16GB", host_memory="96GB")
        >>> engine.generate("Hello", max_new_tokens=8).text
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory; give a dsjax store (made by `dsjax convert`) "
                                "or a Hugging Face checkpoint directory")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not a directory; give a dsjax store (made by `dsjax convert`) or a "
                         "Hugging Face checkpoint directory")
    if not os.path.exists(os.path.join(path, MANIFEST_FILE)) and looks_like_store(path):
        raise StoreError(unfinished_store_message(path))    # not a Hugging Face checkpoint: say what it is
    dt = _dtype(dtype)
    if progress is None:
        progress = sys.stderr.isatty()
    is_store = os.path.exists(os.path.join(path, MANIFEST_FILE))
    if devices is not None:
        from dsjax.runtime.parallel import ENGINE_OPTIONS, as_mesh, fits_resident, load_parallel
        if in_memory:
            raise ValueError("in_memory=True is the one-device all-in-HBM reference; with devices= every weight is "
                             "resident already when the budget holds each device's share: drop in_memory")
        tiered = [k for k, v in (("preset", preset), ("links", links)) if v] + sorted(set(overrides) - ENGINE_OPTIONS)
        fits = gpu_memory is None or (is_store and fits_resident(path, as_mesh(devices).devices.size, gpu_memory,
                                                                 dtype, overrides))
        if is_store and (tiered or not fits):
            # tiered expert parallelism: each device its own expert slots, host cache and link (tiered.py)
            if jax.process_count() > 1:
                raise NotImplementedError("tiered expert parallelism (budgets or tiered options with devices=) runs "
                                          "in one process; over several processes every weight must be resident: "
                                          f"drop {', '.join(tiered) or 'the budget'} or give more devices")
            devs = list(as_mesh(devices).devices.flat)
            return _load_tiered(path, dt, preset, gpu_memory, host_memory, links, prefill_form, overrides, devs)
        if tiered:
            raise ValueError(f"{path} is a Hugging Face checkpoint: {', '.join(tiered)} belong(s) to the tiered "
                             "runtime of dsjax stores; convert it first with `dsjax convert SRC DST --format nvfp4`")
        # every weight resident, the experts split: gpu_memory applies to each device (checked, and it sizes the KV
        # pool); nothing is held in host memory, so any host_memory is met
        return load_parallel(path, devices, dtype, prefill_form=prefill_form, progress=progress,
                             gpu_memory=gpu_memory, **overrides)
    tok = Tokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    name = os.path.basename(os.path.normpath(path))
    if is_store:
        from dsjax.runtime.tiered import in_memory_engine
        from dsjax.store.reader import Store
        if in_memory:
            fusion = overrides.pop("enable_fusion", True)
            active = overrides.pop("active_experts", 0)
            if preset or gpu_memory is not None or host_memory is not None or overrides or links is not None:
                raise ValueError("in_memory=True loads the whole store onto the GPU: presets, budgets, links and "
                                 "runtime options other than enable_fusion and active_experts do not apply (drop "
                                 "them, or load without in_memory)")
            return in_memory_engine(Store(path), dt, tok, prefill_form=prefill_form, name=name, enable_fusion=fusion,
                                    active_experts=active)
        return _load_tiered(path, dt, preset, gpu_memory, host_memory, links, prefill_form, overrides)
    active = overrides.pop("active_experts", 0)
    if preset or gpu_memory is not None or host_memory is not None or overrides or links is not None:
        raise ValueError(f"{path} is a Hugging Face checkpoint: presets, budgets, links and runtime options (but "
                         "active_experts) apply to dsjax stores; convert it first with `dsjax convert SRC DST "
                         "--format nvfp4`")
    cfg = ModelConfig.from_json(path)
    from dsjax.runtime.config import active_experts_config
    run_cfg = active_experts_config(cfg, active)        # checked before the weights are read
    ck = Checkpoint(path)
    try:
        weights = {k: jax.device_put(read_global(ck, cfg, k, dt)) for k in ("embed", "final_norm", "lm_head")}
        weights["layers"] = []
        for i in tqdm(range(cfg.num_hidden_layers), desc="loading layers", unit="layer", disable=not progress):
            weights["layers"].append({k: jax.device_put(v) for k, v in read_layer(ck, cfg, i, dt).items()})
    finally:
        ck.close()
    return Engine(run_cfg, weights, tok, prefill_form=prefill_form, name=name)
