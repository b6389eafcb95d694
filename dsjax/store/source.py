"""The converter's view of a source checkpoint: one tensor (or one expert) at a time, in any input format.

Inputs (reference/deepseek-spec.md §3):
    bf16 / fp16 / fp32 safetensors            read as is (memory-mapped, no copy)
    DeepSeek FP8 block (weight_scale_inv)      dequantized to float32 by hf_names.read_float
    NVIDIA ModelOpt NVFP4 (weight U8 [N, K/2], weight_scale E4M3 [N, K/16], weight_scale_2 F32 [])
                                               returned as a QTensor bit for bit (`from_modelopt_nvfp4`)
Names come from dsjax/store/hf_names.py (the one table); both expert namings (per expert, transformers-v5 fused)
work. `preflight` checks every tensor's presence, shape and dtype from the safetensors headers before any byte is
converted, so a bad checkpoint fails in seconds with the tensor's name, not hours into a conversion.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from typing import Any

import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.weights import global_shapes, layer_shapes
from dsjax.quant import QTensor, from_modelopt_nvfp4
from dsjax.store.hf_names import (
    EXPERT_NAMES, FUSED_DOWN, FUSED_GATE_UP, GLOBAL_NAMES, hf_name, layer_prefix, read_float,
)
from dsjax.store.safetensors_io import Checkpoint, CheckpointError

HF_QUANT_CONFIG = "hf_quant_config.json"
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
FP8_SCALE = "_scale_inv"                                     # DeepSeek FP8: <name>_scale_inv beside <name>
NVFP4_SCALE, NVFP4_SCALE_2 = "weight_scale", "weight_scale_2"  # ModelOpt: <module>.weight_scale(_2)


@dataclasses.dataclass(frozen=True)
class Ref:
    """Where one logical tensor (or one expert's matrix) lives in the source.

    `name` is the safetensors tensor; `index` selects an expert (and gate/up rows) inside a fused tensor.
    """

    key: str
    name: str
    shape: tuple[int, ...]              # logical shape
    layer: int | None = None
    index: tuple | None = None
    share: float = 1.0                  # fraction of the named tensor's bytes this ref reads (fused experts)


class Source:
    """A Hugging Face checkpoint opened for conversion.

    Example:
        >>> src = Source("DeepSeek-V3"); src.preflight()
        >>> w = src.read(src.layer_ref(3, "q_a"))          # np.ndarray (float) or QTensor (NVFP4 input)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        self.config_path = os.path.join(self.path, "config.json")
        self.cfg = ModelConfig.from_json(self.path)
        with open(self.config_path) as f:
            self.raw_config: dict[str, Any] = json.load(f)
        self.ck = Checkpoint(self.path)
        self.quant_config = self._quant_config()
        self.exclude_modules: list[str] = list((self.quant_config or {}).get("exclude_modules") or [])

    # ---- input formats ---------------------------------------------------------------------------
    def _quant_config(self) -> dict[str, Any] | None:
        """ModelOpt's quantization section (hf_quant_config.json, or config.json quantization_config); validates
        the DeepSeek FP8 block size too. Unsupported quantization schemes are an error here, not garbage later."""
        qc = self.raw_config.get("quantization_config") or {}
        method = qc.get("quant_method")
        if method == "fp8":
            block = qc.get("weight_block_size", [128, 128])
            if list(block) != [128, 128]:
                raise CheckpointError(f"{self.config_path}: FP8 weight_block_size {block} is not supported "
                                      "(dsjax reads DeepSeek's 128x128 blocks)")
        p = os.path.join(self.path, HF_QUANT_CONFIG)
        if os.path.exists(p):
            with open(p) as f:
                q = json.load(f).get("quantization") or {}
        elif method == "modelopt":
            q = {"quant_algo": qc.get("quant_algo"), "group_size": qc.get("group_size", 16),
                 "exclude_modules": qc.get("ignore") or qc.get("exclude_modules") or []}
        else:
            return None
        algo = q.get("quant_algo")
        if algo != "NVFP4" or int(q.get("group_size", 16)) != 16:
            raise CheckpointError(f"{p}: quant_algo {algo!r} with group_size {q.get('group_size')} is not supported; "
                                  "dsjax reads ModelOpt NVFP4 (group_size 16), DeepSeek FP8 and bf16/fp32")
        return q

    def is_nvfp4(self, name: str) -> bool:
        base = name[: -len("weight")] if name.endswith(".weight") else None
        return (base is not None and self.ck.info(name).dtype == "U8" and (base + NVFP4_SCALE) in self.ck)

    def source_dtype(self, name: str) -> str:
        return "NVFP4" if self.is_nvfp4(name) else self.ck.info(name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes of a tensor with its scale siblings."""
        n = self.ck.info(name).nbytes
        base = name[: -len("weight")]
        for sib in (name + FP8_SCALE, base + NVFP4_SCALE, base + NVFP4_SCALE_2, base + "input_scale"):
            if sib in self.ck and sib != name:
                n += self.ck.info(sib).nbytes
        return n

    def excluded(self, name: str) -> bool:
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        return any(fnmatch.fnmatchcase(module, g) for g in self.exclude_modules)

    # ---- addressing ------------------------------------------------------------------------------
    def global_ref(self, key: str) -> Ref:
        name = GLOBAL_NAMES[key]
        if key == "lm_head" and name not in self.ck and self.cfg.tie_word_embeddings:
            name = GLOBAL_NAMES["embed"]
        return Ref(key, name, global_shapes(self.cfg)[key])

    def layer_ref(self, i: int, key: str) -> Ref:
        return Ref(key, hf_name(key, i), layer_shapes(self.cfg, i)[key], layer=i)

    def expert_ref(self, i: int, key: str, e: int) -> Ref:
        shape = layer_shapes(self.cfg, i)[key][1:]
        if layer_prefix(i) + FUSED_GATE_UP not in self.ck:
            return Ref(key, hf_name(key, i, e), shape, layer=i)
        E, I = self.cfg.n_routed_experts, self.cfg.moe_intermediate_size
        if key == "experts_down":
            return Ref(key, layer_prefix(i) + FUSED_DOWN, shape, i, (e,), 1.0 / E)
        rows = slice(0, I) if key == "experts_gate" else slice(I, 2 * I)
        return Ref(key, layer_prefix(i) + FUSED_GATE_UP, shape, i, (e, rows), 0.5 / E)

    def ref_bytes(self, ref: Ref) -> int:
        return int(self.nbytes(ref.name) * ref.share)

    # ---- checks and reads ------------------------------------------------------------------------
    def _stored_shape(self, ref: Ref) -> tuple[int, ...]:
        info = self.ck.info(ref.name)
        shape = tuple(info.shape)
        if self.is_nvfp4(ref.name):
            shape = shape[:-1] + (2 * shape[-1],)                     # packed [N, K/2] is logically [N, K]
        if ref.index is not None:                                      # fused [E, 2I, D] / [E, D, I]
            E, I = self.cfg.n_routed_experts, self.cfg.moe_intermediate_size
            want = (E, 2 * I, shape[-1]) if ref.name.endswith(FUSED_GATE_UP) else (E,) + ref.shape
            if shape != want:
                raise CheckpointError(f"{self.path}: tensor {ref.name!r} has shape {list(shape)}, expected "
                                      f"{list(want)} from config.json")
            return ref.shape
        return shape

    def check(self, ref: Ref) -> None:
        """Presence, shape and dtype of one ref, from headers only."""
        if ref.name not in self.ck:
            what = f"expected shape {list(ref.shape)}"
            raise CheckpointError(f"{self.path}: missing tensor {ref.name!r} ({what}); the checkpoint is incomplete "
                                  "or does not match its config.json")
        info = self.ck.info(ref.name)
        if info.dtype not in FLOAT_DTYPES:
            fp8 = info.dtype == "F8_E4M3" and (ref.name + FP8_SCALE) in self.ck
            if not (fp8 or self.is_nvfp4(ref.name)):
                raise CheckpointError(
                    f"{self.path}: tensor {ref.name!r} has unsupported dtype {info.dtype} (no scale tensor beside "
                    "it); dsjax converts BF16/F16/F32, DeepSeek FP8 (F8_E4M3 + weight_scale_inv) and ModelOpt "
                    "NVFP4 (U8 + weight_scale + weight_scale_2)")
            if self.is_nvfp4(ref.name) and self.excluded(ref.name):
                raise CheckpointError(f"{self.path}: tensor {ref.name!r} is NVFP4 but {HF_QUANT_CONFIG} "
                                      "exclude_modules lists its module as unquantized; the export is inconsistent")
        shape = self._stored_shape(ref)
        if shape != tuple(ref.shape):
            raise CheckpointError(f"{self.path}: tensor {ref.name!r} has shape {list(shape)}, expected "
                                  f"{list(ref.shape)} from config.json; the checkpoint and its config disagree")

    def refs(self) -> list[Ref]:
        return ordered_refs(self)

    def preflight(self) -> None:
        for ref in self.refs():
            self.check(ref)

    def read(self, ref: Ref) -> np.ndarray | QTensor:
        """The tensor: a QTensor for NVFP4 input, else a float array (a read-only view of the file when the source
        is already float; a fresh float32 array for FP8)."""
        self.check(ref)
        if self.is_nvfp4(ref.name):
            base = ref.name[: -len("weight")]
            q = from_modelopt_nvfp4(self.ck.read(ref.name), self.ck.read(base + NVFP4_SCALE),
                                    self.ck.read(base + NVFP4_SCALE_2))
            return q
        a = read_float(self.ck, ref.name)
        if ref.index is not None:
            a = a[ref.index]
        return a

    # ---- identity --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """blake2b over config.json, the quantization config and every tensor's name, dtype, shape and size.

        Identifies the conversion job for resuming without reading hundreds of GB of data: a different checkpoint
        (other config, tensors, dtypes or shapes) is refused; the same tensors with other values are not detected.
        """
        h = hashlib.blake2b(digest_size=16)
        with open(self.config_path, "rb") as f:
            h.update(f.read())
        h.update(json.dumps(self.quant_config, sort_keys=True).encode())
        for name in sorted(self.ck.names()):
            info = self.ck.info(name)
            h.update(f"{name}|{info.dtype}|{list(info.shape)}|{info.nbytes}\n".encode())
        return "blake2b:" + h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """The manifest's `source` section."""
        counts: dict[str, int] = {}
        for name in dict.fromkeys(ref.name for ref in self.refs()):
            d = self.source_dtype(name)
            counts[d] = counts.get(d, 0) + 1
        return {"name": os.path.basename(os.path.normpath(self.path)), "fingerprint": self.fingerprint(),
                "tensor_dtypes": dict(sorted(counts.items())), "hf_quant_config": self.quant_config}

    def close(self) -> None:
        self.ck.close()


def is_fp4(value) -> bool:
    return isinstance(value, QTensor)


def ordered_refs(src) -> list[Ref]:
    """Every ref the model needs, in conversion order, from a source's global_ref / layer_ref / expert_ref (MTP
    layers >= num_hidden_layers are not part of it)."""
    out = [src.global_ref("embed")]
    for i in range(src.cfg.num_hidden_layers):
        for key, shape in layer_shapes(src.cfg, i).items():
            if key in EXPERT_NAMES:
                out += [src.expert_ref(i, key, e) for e in range(shape[0])]
            else:
                out.append(src.layer_ref(i, key))
    return out + [src.global_ref("final_norm"), src.global_ref("lm_head")]
