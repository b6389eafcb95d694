"""The one table between Hugging Face DeepSeek tensor names and dsjax weight keys, and reading a layer by it.

Handles hub per-expert names (`mlp.experts.{e}.gate_proj.weight`) and transformers-v5 fused experts
(`mlp.experts.gate_up_proj` [E, 2I, D] with gate rows first, `mlp.experts.down_proj` [E, D, I]), and turns FP8-block
weights (`weight_scale_inv`) into floats. Layers at index >= num_hidden_layers (MTP) are never read.
"""

from __future__ import annotations

import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.weights import global_shapes, layer_shapes, tensor_dtype
from dsjax.store.safetensors_io import Checkpoint, CheckpointError

GLOBAL_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}

LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "q_a": "self_attn.q_a_proj.weight",
    "q_a_norm": "self_attn.q_a_layernorm.weight",
    "q_b": "self_attn.q_b_proj.weight",
    "kv_a": "self_attn.kv_a_proj_with_mqa.weight",
    "kv_a_norm": "self_attn.kv_a_layernorm.weight",
    "kv_b": "self_attn.kv_b_proj.weight",
    "o": "self_attn.o_proj.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "router": "mlp.gate.weight",
    "router_bias": "mlp.gate.e_score_correction_bias",
    "shared_gate": "mlp.shared_experts.gate_proj.weight",
    "shared_up": "mlp.shared_experts.up_proj.weight",
    "shared_down": "mlp.shared_experts.down_proj.weight",
}
EXPERT_NAMES = {"experts_gate": "mlp.experts.{e}.gate_proj.weight",
                "experts_up": "mlp.experts.{e}.up_proj.weight",
                "experts_down": "mlp.experts.{e}.down_proj.weight"}
FUSED_GATE_UP = "mlp.experts.gate_up_proj"
FUSED_DOWN = "mlp.experts.down_proj"


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def hf_name(key: str, layer: int | None = None, expert: int | None = None) -> str:
    """HF name of a dsjax key (global when layer is None; per-expert name when expert is given)."""
    if layer is None:
        return GLOBAL_NAMES[key]
    if expert is not None:
        return layer_prefix(layer) + EXPERT_NAMES[key].format(e=expert)
    return layer_prefix(layer) + LAYER_NAMES[key]


def read_float(ck: Checkpoint, name: str) -> np.ndarray:
    """A tensor as float32 (or its float dtype), dequantizing DeepSeek FP8-block weights."""
    a = ck.read(name)
    if a.dtype.itemsize == 1 and (name + "_scale_inv") in ck:
        from dsjax.quant.fp8_block import dequantize_fp8_block
        return dequantize_fp8_block(a, ck.read(name + "_scale_inv"))
    if a.dtype == np.uint8 and name.endswith(".weight") and (name[:-len("weight")] + "weight_scale") in ck:
        from dsjax.quant import dequantize_np, from_modelopt_nvfp4
        base = name[:-len("weight")]
        return dequantize_np(from_modelopt_nvfp4(a, ck.read(base + "weight_scale"), ck.read(base + "weight_scale_2")))
    if a.dtype.kind not in "fV" and a.dtype.name not in ("bfloat16",):
        raise CheckpointError(f"{ck.path}: tensor {name!r} has dtype {a.dtype} and no scale tensor beside it; "
                              "dsjax reads bf16/fp16/fp32, FP8-block (weight_scale_inv) and NVFP4 (weight_scale)")
    return a


def _check(name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(a.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(a.shape)}, expected {list(shape)} from config.json")
    return a


def read_global(ck: Checkpoint, cfg: ModelConfig, key: str, dtype) -> np.ndarray:
    shape = global_shapes(cfg)[key]
    name = GLOBAL_NAMES[key]
    if key == "lm_head" and name not in ck and cfg.tie_word_embeddings:
        name = GLOBAL_NAMES["embed"]
    if name not in ck:
        raise CheckpointError(f"{ck.path}: missing tensor {name!r} (expected shape {list(shape)})")
    return _check(name, read_float(ck, name), shape).astype(tensor_dtype(key, dtype))


def read_layer(ck: Checkpoint, cfg: ModelConfig, i: int, dtype) -> dict[str, np.ndarray]:
    """All tensors of layer i as numpy arrays in `dtype` (router and bias float32), shapes checked."""
    out: dict[str, np.ndarray] = {}
    shapes = layer_shapes(cfg, i)
    fused = layer_prefix(i) + FUSED_GATE_UP in ck
    for key, shape in shapes.items():
        td = tensor_dtype(key, dtype)
        if key in EXPERT_NAMES:
            if fused:
                out[key] = _read_fused_expert(ck, cfg, i, key, shape).astype(td)
            else:
                mats = []
                for e in range(shape[0]):
                    name = hf_name(key, i, e)
                    if name not in ck:
                        raise CheckpointError(f"{ck.path}: missing tensor {name!r} (expected shape {list(shape[1:])})")
                    mats.append(_check(name, read_float(ck, name), shape[1:]).astype(td))
                out[key] = np.stack(mats)
            continue
        name = hf_name(key, i)
        if name not in ck:
            raise CheckpointError(f"{ck.path}: missing tensor {name!r} (expected shape {list(shape)})")
        out[key] = _check(name, read_float(ck, name), shape).astype(td)
    return out


def _read_fused_expert(ck: Checkpoint, cfg: ModelConfig, i: int, key: str, shape) -> np.ndarray:
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    if key == "experts_down":
        name = layer_prefix(i) + FUSED_DOWN
        return _check(name, read_float(ck, name), (E, D, I))
    name = layer_prefix(i) + FUSED_GATE_UP
    gu = _check(name, read_float(ck, name), (E, 2 * I, D))
    return gu[:, :I] if key == "experts_gate" else gu[:, I:]


def expected_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name (hub per-expert naming) a checkpoint of this config must hold."""
    names = [GLOBAL_NAMES[k] for k in global_shapes(cfg)]
    for i in range(cfg.num_hidden_layers):
        for key, shape in layer_shapes(cfg, i).items():
            if key in EXPERT_NAMES:
                names += [hf_name(key, i, e) for e in range(shape[0])]
            else:
                names.append(hf_name(key, i))
    return names
