"""`dsjax.load`: from a checkpoint directory to a ready Engine, reading tensors lazily one at a time."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dsjax.config import ModelConfig
from dsjax.model.attention import MlaForm
from dsjax.runtime.engine import Engine
from dsjax.runtime.tokenizer import Tokenizer
from dsjax.store.hf_names import read_global, read_layer
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


def load(path: str | os.PathLike, dtype: str = "bfloat16", *, prefill_form: MlaForm = "naive",
         progress: bool | None = None) -> Engine:
    """Load a Hugging Face DeepSeek checkpoint directory (config.json, *.safetensors, tokenizer.json) for inference.

    Tensors are read one at a time and placed on the default device; routers stay float32.

    Example:
        >>> engine = dsjax.load("DeepSeek-V2-Lite", dtype="bfloat16")
        >>> engine.generate("Hello", max_new_tokens=8).text
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if os.path.exists(os.path.join(path, "manifest.json")):
        raise NotImplementedError(f"{path} is a dsjax FP4 store; loading stores arrives with the store format")
    dt = _dtype(dtype)
    cfg = ModelConfig.from_json(path)
    ck = Checkpoint(path)
    if progress is None:
        progress = sys.stderr.isatty()
    try:
        weights = {k: jax.device_put(read_global(ck, cfg, k, dt)) for k in ("embed", "final_norm", "lm_head")}
        weights["layers"] = []
        for i in tqdm(range(cfg.num_hidden_layers), desc="loading layers", unit="layer", disable=not progress):
            weights["layers"].append({k: jax.device_put(v) for k, v in read_layer(ck, cfg, i, dt).items()})
    finally:
        ck.close()
    tok = Tokenizer.from_dir(path) if os.path.exists(os.path.join(path, "tokenizer.json")) else None
    return Engine(cfg, weights, tok, prefill_form=prefill_form, name=os.path.basename(os.path.normpath(path)))
