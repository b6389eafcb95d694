"""Tiny real checkpoints for the store tests: bf16, DeepSeek FP8-block and ModelOpt NVFP4, written to disk.

FP8 weights are made from bf16 with DeepSeek's scheme (dsjax.quant.quantize_fp8_block); NVFP4 weights with
dsjax.quant.quantize('nvfp4') in ModelOpt's layout (U8 weight, F8_E4M3 weight_scale, F32 weight_scale_2 scalar,
F32 input_scale, hf_quant_config.json with exclude_modules globs).
"""

import fnmatch
import json
import os

import ml_dtypes
import numpy as np

from dsjax.model.weights import layer_shapes, random_weights
from dsjax.quant import QTensor, dequantize_fp8_block, quantize, quantize_fp8_block
from dsjax.store.hf_names import hf_name
from dsjax.store.hf_write import hf_tensors, write_hf_checkpoint
from model_configs import CONFIGS, config

ORACLE = os.path.join(os.path.dirname(__file__), "data", "oracle")
NOT_LINEAR = ("attn_norm", "mlp_norm", "q_a_norm", "kv_a_norm", "router", "router_bias")
# A wider-than-128 dense MLP (partial 128-row FP8 blocks; K=208 is a multiple of 16 but not of 32 or 128), and
# experts of 48 (K=48 of down_proj: NVFP4 yes, MXFP4 no, so MXFP4 stores exercise plain bf16 routed experts).
SMALL = dict(num_hidden_layers=2, n_routed_experts=8, intermediate_size=208, moe_intermediate_size=48)


def linear_names(cfg) -> list[str]:
    """HF names of the decoder's linear weights (what DeepSeek stores in FP8 and ModelOpt in NVFP4)."""
    names = []
    for i in range(cfg.num_hidden_layers):
        for key, shape in layer_shapes(cfg, i).items():
            if key in NOT_LINEAR:
                continue
            if key.startswith("experts_"):
                names += [hf_name(key, i, e) for e in range(shape[0])]
            else:
                names.append(hf_name(key, i))
    return names


def bf16_tensors(name="v3", seed=3, **over):
    cfg = config(name, **dict(SMALL, **over))
    return cfg, dict(CONFIGS[name], **dict(SMALL, **over)), hf_tensors(cfg, random_weights(cfg, seed=seed))


def write(path, cfg_dict, tensors, quant_config=None, tokenizer_from=None):
    def extra(d):
        if quant_config is not None:
            with open(os.path.join(d, "hf_quant_config.json"), "w") as f:
                json.dump(quant_config, f)
        if tokenizer_from:
            for fn in ("tokenizer.json", "tokenizer_config.json"):
                with open(os.path.join(tokenizer_from, fn), "rb") as a, open(os.path.join(d, fn), "wb") as b:
                    b.write(a.read())
    return write_hf_checkpoint(str(path), cfg_dict, tensors, extra_files=extra)


def to_fp8(cfg, tensors):
    """DeepSeek FP8-block form of the decoder linears (weight F8_E4M3 + weight_scale_inv F32)."""
    out = dict(tensors)
    for n in linear_names(cfg):
        q, s = quantize_fp8_block(tensors[n])
        out[n], out[n + "_scale_inv"] = q, s
    return out


def fp8_dequantized(cfg, fp8):
    """The float32 weights an FP8 checkpoint holds (exactly what the converter computes from it)."""
    out = {k: v for k, v in fp8.items() if not k.endswith("_scale_inv")}
    for n in linear_names(cfg):
        out[n] = dequantize_fp8_block(fp8[n], fp8[n + "_scale_inv"])
    return out


def to_modelopt(cfg, tensors, exclude=("lm_head", "model.layers.*.self_attn*")):
    """ModelOpt NVFP4 form: every decoder linear outside `exclude` as U8/E4M3/F32; returns (tensors, quant_config,
    {name: QTensor} of what was written)."""
    out, written = dict(tensors), {}
    for n in linear_names(cfg):
        module = n[: -len(".weight")]
        if any(fnmatch.fnmatchcase(module, g) for g in exclude):
            continue
        q = quantize(tensors[n].astype(np.float32), "nvfp4")
        # Not what dsjax.quant would choose (block scales one E4M3 step smaller), as an export with its own
        # calibration would be: requantizing instead of copying bits then shows (NVFP4 requantization of
        # dsjax's own output is idempotent).
        q = QTensor(packed=q.packed, scales=np.where(q.scales > 1, q.scales - 1, q.scales).astype(np.uint8),
                    global_scale=q.global_scale, fmt="nvfp4")
        base = n[: -len("weight")]
        out[n] = q.packed
        out[base + "weight_scale"] = q.scales.view(ml_dtypes.float8_e4m3fn)
        out[base + "weight_scale_2"] = np.asarray(q.global_scale, np.float32)
        out[base + "input_scale"] = np.asarray(0.01, np.float32)
        written[n] = q
    qc = {"producer": {"name": "modelopt", "version": "0.23.0"},
          "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                           "exclude_modules": list(exclude)}}
    return out, qc, written


def files_of(path) -> dict[str, bytes]:
    """Every file under a directory, by relative path."""
    out = {}
    for root, _, files in os.walk(path):
        for fn in files:
            p = os.path.join(root, fn)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = f.read()
    return out


def assert_same_files(a, b, skip=()):
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb), f"file sets differ: only in {a}: {sorted(set(fa) - set(fb))}; " \
                                     f"only in {b}: {sorted(set(fb) - set(fa))}"
    diff = [k for k in fa if k not in skip and fa[k] != fb[k]]
    assert not diff, f"files differ: {diff}"
