"""Expert popularity: measured activation counts per layer ([n_layers, E] routed token-expert pairs, the layout of
stats()["expert_activations"]), their JSON file, and the choices made from them: a layer's row for the expert-parallel
split (parallel.py) and the hot set the tiered engine keeps on the GPU (memory_config.hot_experts).

Owns the file format and the choice (with its checks against the model and the GPU slots) only; the engines place
and move the experts.
"""

# L layers, E experts of a MoE layer, N hot experts per MoE layer

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from dsjax.runtime.config import MemoryConfig, RuntimeConfigError
from dsjax.runtime.planner import BudgetError

FORMAT = "dsjax-expert-popularity"
VERSION = 1


def write_popularity(path: str | os.PathLike, activations, *, model: str = "", fingerprint: str | None = None,
                     tokens: int | None = None) -> dict[str, Any]:
    """Write activation counts [L][E] (stats()["expert_activations"]) to `path` as JSON, with the model's name and
    its store's source fingerprint when known (read_popularity checks the shape; the tiered engine the fingerprint).
    Returns what it wrote.

    Example:
        >>> write_popularity("pop.json", engine.stats()["expert_activations"], model="v3")
    """
    counts = np.asarray(activations, np.int64)
    if counts.ndim != 2:
        raise ValueError(f"activations have shape {counts.shape}; expected [n_layers, n_experts]")
    doc = {"format": FORMAT, "version": VERSION, "model": model, "fingerprint": fingerprint,
           "n_layers": int(counts.shape[0]), "n_experts": int(counts.shape[1]), "tokens": tokens,
           "activations": counts.tolist()}
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return doc


def read_popularity(path: str | os.PathLike) -> dict[str, Any]:
    """A file written by write_popularity: its fields, with "activations" as an int64 array [L, E]."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"popularity file {path} does not exist; write one with engine.save_popularity(path) "
                                "or `dsjax generate ... --save-popularity PATH`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"popularity file {path} is not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"popularity file {path} is not a {FORMAT} file; write one with engine.save_popularity(path)")
    counts = np.asarray(doc["activations"], np.int64)
    if counts.shape != (doc["n_layers"], doc["n_experts"]) or (counts < 0).any():
        raise ValueError(f"popularity file {path}: activations of shape {counts.shape} with n_layers="
                         f"{doc['n_layers']}, n_experts={doc['n_experts']}; expected non-negative counts of that shape")
    return dict(doc, activations=counts)


def as_popularity(popularity):
    """Popularity as layer_popularity takes it: a path (str / PathLike) is read (its activations), None and arrays
    or dicts pass through."""
    if isinstance(popularity, (str, os.PathLike)):
        return read_popularity(popularity)["activations"]
    return popularity


def layer_popularity(popularity, layer: int, n_experts: int) -> np.ndarray | None:
    """A layer's popularity row from None, one [E] row for every layer, per-layer rows [n_layers, E] (the layout of
    the tiered runtime's Metrics.activations) or a {layer: [E]} dict."""
    if popularity is None:
        return None
    if isinstance(popularity, dict):
        row = popularity.get(layer)
        return None if row is None else np.asarray(row, np.float64)
    a = np.asarray(popularity, np.float64)
    row = a if a.ndim == 1 else a[layer]
    if row.shape != (n_experts,):
        raise ValueError(f"popularity of layer {layer} has shape {row.shape}; expected [{n_experts}]")
    return row if row.sum() > 0 else None


def popularity_order(popularity, layer: int, n_experts: int) -> np.ndarray:
    """Layer `layer`'s experts, most popular first ([E]; ties and a layer without counts: lower id first)."""
    row = layer_popularity(popularity, layer, n_experts)
    if row is None:
        return np.arange(n_experts)
    if not np.isfinite(row).all() or (row < 0).any():
        raise ValueError(f"popularity of layer {layer} must be finite and >= 0")
    return np.argsort(-row, kind="stable")


def hot_set(popularity, layers, n_experts: int, n: int) -> dict[int, list[int]]:
    """The `n` most popular experts of each of `layers` ({layer: sorted expert ids}): memory_config.hot_experts.

    Example:
        >>> hot_set([[0, 0], [5, 1, 9, 0]], [1], 4, 2)
        {1: [0, 2]}
    """
    if not 0 <= n <= n_experts:
        raise ValueError(f"hot_experts={n} is outside 0..{n_experts} (the experts of a MoE layer)")
    return {i: sorted(int(e) for e in popularity_order(popularity, i, n_experts)[:n]) for i in layers}


def engine_popularity(store, mc, given) -> tuple[Any, str | None]:
    """(popularity, where it came from) for memory_config.hot_experts and the preload order: counts given to
    dsjax.load, else the file memory_config.popularity names (checked against the store), else (None, None); an error
    naming the fix when hot_experts asks for a hot set without one."""
    cfg = store.config
    if mc.hot_experts and not cfg.has_moe:
        raise RuntimeConfigError(f"memory_config.hot_experts={mc.hot_experts}: this model has no routed experts; "
                                 "leave hot_experts at 0")
    if mc.hot_experts > (cfg.n_routed_experts or 0):
        raise RuntimeConfigError(f"memory_config.hot_experts={mc.hot_experts} exceeds the {cfg.n_routed_experts} "
                                 f"routed experts of a MoE layer; choose 1..{cfg.n_routed_experts} (0 = none)")
    if given is not None:
        return given, "counts given to dsjax.load"
    if mc.popularity:
        doc = read_popularity(mc.popularity)
        want = (cfg.num_hidden_layers, cfg.n_routed_experts)
        if doc["activations"].shape != want:
            raise ValueError(f"popularity file {mc.popularity} counts {doc['n_layers']} layers x {doc['n_experts']} "
                             f"experts; this model has {want[0]} x {want[1]}: measure it on this store "
                             "(engine.save_popularity(path) or `dsjax generate ... --save-popularity PATH`)")
        mine = store.manifest.source.get("fingerprint")
        if doc.get("fingerprint") and mine and doc["fingerprint"] != mine:
            raise ValueError(f"popularity file {mc.popularity} was measured on another model (source fingerprint "
                             f"{doc['fingerprint']}, model {doc.get('model')!r}; this store's is {mine}): measure "
                             "it on this store (engine.save_popularity(path) or `dsjax generate ... "
                             "--save-popularity PATH`)")
        return doc["activations"], mc.popularity
    if mc.hot_experts:
        raise RuntimeConfigError(
            f"memory_config.hot_experts={mc.hot_experts} keeps the most popular experts of each MoE layer on the GPU "
            "and needs measured popularity to choose them: run representative prompts and save their expert "
            "activations (engine.save_popularity(PATH), or `dsjax generate ... --save-popularity PATH`), then load "
            "with popularity=PATH (`--set popularity=PATH`), or give counts to dsjax.load(..., popularity=...)")
    return None, None


def check_hot_room(n: int, moe: int, slots: int, top_k: int, prefetch_layers: int) -> None:
    """The hot set must leave the slots the runtime needs free: one MoE layer's experts in flight and those copied
    ahead for the next prefetch_layers (the planner's top_k x (1 + prefetch_layers))."""
    in_flight = top_k * (1 + prefetch_layers)
    if n * moe + in_flight > slots:
        most = max(0, (slots - in_flight) // moe)
        raise BudgetError(f"memory_config.hot_experts={n} pins {n * moe} GPU expert slots ({n} x {moe} MoE layers) "
                          f"and the GPU expert pool has {slots}, of which {in_flight} must stay free for experts in "
                          f"flight (top_k {top_k} x (1 + prefetch_layers {prefetch_layers})): at most {most} hot "
                          "experts per MoE layer fit this budget; lower hot_experts or raise gpu_memory")
