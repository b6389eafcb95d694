"""A synthetic source for the converter: random weights of any DeepSeek config, straight into the store format.

For benchmarks at real width (issue 5: a DeepSeek-V3 slice with V3's true per-layer sizes) without a 1.3 TB
checkpoint. Tensors the policy stores in FP4 are generated as NVFP4 codes and scales (random nibbles, E4M3 block
scales near 1, a per-matrix scale that gives the weights a 1/sqrt(fan_in) spread), so the converter stores them bit
for bit with no quantization work; the rest are Gaussian in bf16 (norm weights near 1, router bias small). Every
tensor is a pure function of (seed, tensor name): runs are deterministic and resumable like any conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.weights import F32_KEYS, global_shapes, layer_shapes
from dsjax.quant import QTensor
from dsjax.store import policy as policy_lib
from dsjax.store.hf_names import GLOBAL_NAMES, hf_name
from dsjax.store.source import Ref, ordered_refs

E2M1_RMS = float(np.sqrt(np.mean(np.square([0, 0.5, 1, 1.5, 2, 3, 4, 6]))))
# E4M3 codes of 0.75, 0.875, 1.0, 1.125, 1.25: block scales near one.
E4M3_NEAR_ONE = np.array([0x36, 0x37, 0x38, 0x39, 0x3A], np.uint8)


class SyntheticSource:
    """Stands in for `dsjax.store.source.Source` in `convert`: same addressing, generated data.

    Example:
        >>> src = SyntheticSource(v3_slice_config(n_moe_layers=6), "/nvme/v3-slice-src", policy="mlp")
        >>> convert(src, "/nvme/v3-slice-nvfp4", fmt="nvfp4", policy="mlp")
    """

    def __init__(self, config: dict[str, Any], workdir: str | os.PathLike, *, policy: str | None = "mlp",
                 seed: int = 0):
        """policy None: every tensor plain (bf16 / float32), for Hugging Face checkpoints."""
        self.raw_config = dict(config)
        self.cfg = ModelConfig.from_dict(self.raw_config)
        self.path = os.fspath(workdir)
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, "config.json"), "w") as f:   # copied into the store like a real one
            json.dump(self.raw_config, f, indent=2)
        self.policy = policy
        self.seed = seed
        self.quant_config = None

    # ---- addressing (as Source) ------------------------------------------------------------------
    def global_ref(self, key: str) -> Ref:
        return Ref(key, GLOBAL_NAMES[key], global_shapes(self.cfg)[key])

    def layer_ref(self, i: int, key: str) -> Ref:
        return Ref(key, hf_name(key, i), layer_shapes(self.cfg, i)[key], layer=i)

    def expert_ref(self, i: int, key: str, e: int) -> Ref:
        return Ref(key, hf_name(key, i, e), layer_shapes(self.cfg, i)[key][1:], layer=i)

    def refs(self) -> list[Ref]:
        return ordered_refs(self)

    def _index(self) -> list[Ref]:
        if not hasattr(self, "_refs"):
            self._refs = self.refs()
            self._by_name = {r.name: r for r in self._refs}
        return self._refs

    def _fp4(self, ref: Ref) -> bool:
        return self.policy is not None and policy_lib.decide(ref.key, tuple(ref.shape), "nvfp4", self.policy).fp4

    def is_nvfp4(self, name: str) -> bool:
        self._index()
        ref = self._by_name.get(name)
        return ref is not None and self._fp4(ref)

    def source_dtype(self, name: str) -> str:
        self._index()
        ref = self._by_name[name]
        return "NVFP4" if self._fp4(ref) else ("F32" if ref.key in F32_KEYS else "BF16")

    def ref_bytes(self, ref: Ref) -> int:
        n = int(np.prod(ref.shape, dtype=np.int64))
        if self._fp4(ref):
            return n // 2 + n // 16 + 4
        return n * (4 if ref.key in F32_KEYS else 2)

    # ---- data --------------------------------------------------------------------------------------
    def _rng(self, name: str) -> np.random.Generator:
        digest = hashlib.blake2b(f"{self.seed}|{name}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def read(self, ref: Ref) -> np.ndarray | QTensor:
        rng = self._rng(ref.name)
        shape = tuple(ref.shape)
        if self._fp4(ref):
            n, k = shape[-2], shape[-1]
            packed = np.frombuffer(rng.bytes(n * k // 2), np.uint8).reshape(n, k // 2)
            scales = E4M3_NEAR_ONE[rng.integers(0, len(E4M3_NEAR_ONE), (n, k // 16))]
            global_scale = np.float32(1.0 / (E2M1_RMS * np.sqrt(k)))
            return QTensor(packed=packed, scales=scales, global_scale=global_scale, fmt="nvfp4")
        if ref.key.endswith("norm"):
            a = 1.0 + 0.05 * rng.standard_normal(shape, np.float32)
        elif ref.key == "router_bias":
            a = 0.01 * rng.standard_normal(shape, np.float32)
        elif ref.key == "embed":
            a = rng.standard_normal(shape, np.float32)
        else:
            a = rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(shape[-1]))
        return a if ref.key in F32_KEYS else a.astype(ml_dtypes.bfloat16)

    # ---- identity (as Source) ------------------------------------------------------------------------
    def preflight(self) -> None:
        self._index()

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.raw_config, sort_keys=True).encode())
        h.update(f"synthetic|seed={self.seed}|policy={self.policy}".encode())
        return "blake2b:" + h.hexdigest()

    def describe(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for ref in self._index():
            d = self.source_dtype(ref.name)
            counts[d] = counts.get(d, 0) + 1
        return {"name": f"synthetic-seed{self.seed}", "fingerprint": self.fingerprint(),
                "tensor_dtypes": dict(sorted(counts.items())), "hf_quant_config": None}

    def close(self) -> None:
        pass


def v3_slice_config(n_moe_layers: int, **over: Any) -> dict[str, Any]:
    """DeepSeek-V3's true widths (hidden 7168, 256 routed + 1 shared expert of 2048, MLA dims, vocab 129280) with
    one dense layer and `n_moe_layers` MoE layers: per-layer figures extrapolate to V3's 61 layers on paper."""
    cfg = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=1 + n_moe_layers,
        first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc",
        scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1)
    cfg.update(over)
    return cfg
