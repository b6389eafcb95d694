"""Model configuration: a frozen, hashable view of a Hugging Face DeepSeek `config.json`.

Owns the architecture numbers and the derived quantities (softmax scale, rope frequencies, layer kinds).
Does not own budgets, paths, devices or meshes: those belong to the runtime configuration.
Field names and defaults follow reference/deepseek-spec.md §1 (HF names).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")
ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


class ConfigError(ValueError):
    """A config.json that dsjax cannot run, with the field at fault in the message."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """YaRN parameters (the only rope scaling DeepSeek checkpoints use)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3-family model. Frozen and hashable: usable as a static jit argument.

    Example:
        >>> cfg = ModelConfig.from_json("path/to/config.json")
        >>> cfg.layer_kind(0), cfg.softmax_scale
    """

    model_type: str = "deepseek_v3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    topk_method: Literal["noaux_tc", "group_limited_greedy", "greedy"] = "noaux_tc"
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Not an HF field: the model's own num_experts_per_tok when the runtime option active_experts routes each token to
    # fewer (then num_experts_per_tok is that smaller k); None = num_experts_per_tok is the model's (`with_top_k`).
    model_experts_per_tok: int | None = None

    # ---- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: normed latent + rotated rope key (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, i: int) -> bool:
        # DeepSeek remote-code rule (spec §1); HF native ignores moe_layer_freq (always 1 in practice).
        return self.has_moe and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def layer_kind(self, i: int) -> Literal["dense", "moe"]:
        return "moe" if self.is_moe_layer(i) else "dense"

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_hidden_layers))

    @property
    def model_top_k(self) -> int:
        """The experts per token the model was trained with (num_experts_per_tok unless `with_top_k` lowered it)."""
        return self.model_experts_per_tok or self.num_experts_per_tok or 0

    def with_top_k(self, k: int) -> "ModelConfig":
        """This model routing each token to the top k of its own selection rule (k <= model_top_k), weights
        renormalised as the model renormalises its own top-k (moe.route): the runtime's active_experts. k equal to the
        model's gives the model's own config back. The caller checks k (runtime/config.py `active_experts_config`)."""
        K = self.model_top_k
        if k == K:
            return dataclasses.replace(self, num_experts_per_tok=K, model_experts_per_tok=None)
        return dataclasses.replace(self, num_experts_per_tok=k, model_experts_per_tok=K)

    @property
    def shared_intermediate_size(self) -> int:
        return (self.n_shared_experts or 0) * self.moe_intermediate_size

    @property
    def uses_router_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times yarn mscale(factor, mscale_all_dim)^2 when yarn is configured (HF semantics)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Amplitude HF applies to cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim) (spec §2.4)."""
        rs = self.rope_scaling
        if rs is None:
            return 1.0
        if rs.mscale is not None and rs.mscale_all_dim is not None:
            return yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
        if rs.mscale is not None:
            return yarn_get_mscale(rs.factor, rs.mscale)
        # HF fallback when neither key is present: 0.1*ln(factor)+1 on cos/sin.
        return yarn_get_mscale(rs.factor, 1.0)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read `config.json` (or the directory holding it)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such file or directory; give a checkpoint directory or its config.json")
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise ConfigError(f"{path}: no config.json; a Hugging Face checkpoint directory needs one")
        with open(path, "rb") as f:
            try:
                raw = json.loads(f.read().decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e}); give a checkpoint directory or its config.json") \
                    from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: not a model config (a JSON {type(raw).__name__}, not an object)")
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a parsed HF config dict; unknown model types and missing required fields are errors."""
        if "text_config" in raw and "hidden_size" not in raw:
            raw = raw["text_config"]  # VLM wrappers (Kimi-K2.5) carry the language model here
        mt = raw.get("model_type")
        archs = raw.get("architectures") or []
        if mt not in MODEL_TYPES and not any(a in ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{source}: model_type {mt!r} is not supported; dsjax runs {', '.join(MODEL_TYPES)} "
                f"(architectures {', '.join(ARCHITECTURES)})")
        if mt not in MODEL_TYPES:
            mt = "deepseek_v3"
        v2 = mt == "deepseek_v2"

        def req(name: str) -> Any:
            if name not in raw:
                raise ConfigError(f"{source}: required field {name!r} is missing")
            return raw[name]

        defaults: dict[str, Any] = (
            # HF DeepseekV2Config defaults differ from V3's (spec §1).
            dict(topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1, norm_topk_prob=False)
            if v2 else
            dict(topk_method="noaux_tc", scoring_func="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True))

        def get(name: str, default: Any) -> Any:
            v = raw.get(name, default)
            return default if v is None and default is not None else v

        def as_int(name: str, v: Any) -> int | None:
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
                raise ConfigError(f"{source}: {name}={v!r} must be an integer")
            return int(v)

        def as_float(name: str, v: Any) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{source}: {name}={v!r} must be a number")
            return float(v)

        n_routed = as_int("n_routed_experts", raw.get("n_routed_experts"))
        kw: dict[str, Any] = dict(
            model_type=mt,
            vocab_size=as_int("vocab_size", req("vocab_size")),
            hidden_size=as_int("hidden_size", req("hidden_size")),
            intermediate_size=as_int("intermediate_size", req("intermediate_size")),
            moe_intermediate_size=as_int("moe_intermediate_size", raw.get("moe_intermediate_size") or 0)
            if not n_routed else as_int("moe_intermediate_size", req("moe_intermediate_size")),
            num_hidden_layers=as_int("num_hidden_layers", req("num_hidden_layers")),
            num_attention_heads=as_int("num_attention_heads", req("num_attention_heads")),
            kv_lora_rank=as_int("kv_lora_rank", req("kv_lora_rank")),
            q_lora_rank=as_int("q_lora_rank", raw.get("q_lora_rank")),
            qk_nope_head_dim=as_int("qk_nope_head_dim", get("qk_nope_head_dim", 128)),
            qk_rope_head_dim=as_int("qk_rope_head_dim", get("qk_rope_head_dim", 64)),
            v_head_dim=as_int("v_head_dim", get("v_head_dim", 128)),
            n_routed_experts=n_routed,
            n_shared_experts=as_int("n_shared_experts", raw.get("n_shared_experts")),
            num_experts_per_tok=as_int("num_experts_per_tok", raw.get("num_experts_per_tok")),
            first_k_dense_replace=as_int("first_k_dense_replace", get("first_k_dense_replace", 0)),
            moe_layer_freq=as_int("moe_layer_freq", get("moe_layer_freq", 1)),
            n_group=as_int("n_group", get("n_group", defaults["n_group"])),
            topk_group=as_int("topk_group", get("topk_group", defaults["topk_group"])),
            topk_method=get("topk_method", defaults["topk_method"]),
            scoring_func=get("scoring_func", defaults["scoring_func"]),
            routed_scaling_factor=as_float("routed_scaling_factor", get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(get("norm_topk_prob", defaults["norm_topk_prob"])),
            rope_theta=as_float("rope_theta", _rope_theta(raw)),
            rope_scaling=_rope_scaling(raw, source),
            max_position_embeddings=as_int("max_position_embeddings", get("max_position_embeddings", 4096)),
            rms_norm_eps=as_float("rms_norm_eps", get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            num_nextn_predict_layers=as_int("num_nextn_predict_layers", get("num_nextn_predict_layers", 0)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=tuple(raw["eos_token_id"]) if isinstance(raw.get("eos_token_id"), list)
            else raw.get("eos_token_id"),
        )
        cfg = cls(**kw)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Raise ConfigError naming the first field whose value the model cannot run: every size positive (a
        negative or zero width would plan negative bytes and run garbage), every ratio finite, and the divisibility
        the model needs (rope pairs, expert groups)."""
        def bad(field: str, why: str, obj: Any = None) -> ConfigError:
            value = getattr(self if obj is None else obj, field.rsplit(".", 1)[-1])
            return ConfigError(f"{source}: {field}={value!r} {why}")

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise bad(f, "must be positive")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise bad("q_lora_rank", "must be positive (or null: no query compression, as in V2-Lite)")
        if self.n_routed_experts is not None and self.n_routed_experts <= 0:
            raise bad("n_routed_experts", "must be positive (or absent/null for a model without routed experts)")
        for f in ("first_k_dense_replace", "num_nextn_predict_layers", "intermediate_size", "moe_intermediate_size"):
            if getattr(self, f) < 0:
                raise bad(f, "must not be negative")
        if self.n_shared_experts is not None and self.n_shared_experts < 0:
            raise bad("n_shared_experts", "must not be negative")
        if self.moe_layer_freq < 1:
            raise bad("moe_layer_freq", "must be >= 1")
        if "dense" in self.layer_kinds and self.intermediate_size <= 0:
            raise bad("intermediate_size", "must be positive: the model has dense MLP layers (first_k_dense_replace="
                                           f"{self.first_k_dense_replace})")
        for f in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            v = getattr(self, f)
            if not math.isfinite(v) or v <= 0:
                raise bad(f, "must be a positive finite number")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (rope rotates pairs)")
        rs = self.rope_scaling
        if rs is not None:
            if not math.isfinite(rs.factor) or rs.factor <= 0:
                raise bad("rope_scaling.factor", "must be a positive finite number", rs)
            if rs.original_max_position_embeddings <= 0:
                raise bad("rope_scaling.original_max_position_embeddings", "must be positive", rs)
            for f in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                v = getattr(rs, f)
                if v is not None and not math.isfinite(v):
                    raise bad(f"rope_scaling.{f}", "must be finite", rs)
        if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
            raise bad("topk_method", "is not one of noaux_tc, group_limited_greedy, greedy")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise bad("scoring_func", "is not one of sigmoid, softmax")
        if self.has_moe:
            for f in ("num_experts_per_tok", "moe_intermediate_size"):
                if not getattr(self, f):
                    raise bad(f, "must be set for a model with routed experts")
                if getattr(self, f) < 0:
                    raise bad(f, "must be positive")
            if self.n_group < 1:
                raise bad("n_group", "must be >= 1")
            if self.n_routed_experts % self.n_group:
                raise bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if not 1 <= self.topk_group <= self.n_group:
                raise bad("topk_group", f"must lie in 1..n_group={self.n_group}")
            if self.num_experts_per_tok > self.n_routed_experts:
                raise bad("num_experts_per_tok", f"exceeds n_routed_experts={self.n_routed_experts}")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                raise bad("n_group", "leaves fewer than 2 experts per group (noaux_tc scores a group by its top 2)")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise bad("num_experts_per_tok", "exceeds the experts in the kept groups (topk_group * experts/group)")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers v5 writes rope_parameters = {rope_type, rope_theta, ...}; hub configs use rope_theta.
    rp = raw.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        return rp["rope_theta"]
    return raw.get("rope_theta", 10000.0)


def _rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling | None:
    rs = raw.get("rope_scaling")
    if rs is None and isinstance(raw.get("rope_parameters"), dict):
        rs = raw["rope_parameters"]
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (DeepSeek models use 'yarn')")
    if "factor" not in rs:
        raise ConfigError(f"{source}: rope_scaling is yarn but its required field 'factor' is missing")
    orig = rs.get("original_max_position_embeddings")
    if orig is None:
        raise ConfigError(f"{source}: rope_scaling is yarn but 'original_max_position_embeddings' is missing")
    return RopeScaling(
        factor=float(rs["factor"]),
        original_max_position_embeddings=int(orig),
        beta_fast=float(rs.get("beta_fast", 32.0)),
        beta_slow=float(rs.get("beta_slow", 1.0)),
        mscale=None if rs.get("mscale") is None else float(rs["mscale"]),
        mscale_all_dim=None if rs.get("mscale_all_dim") is None else float(rs["mscale_all_dim"]),
        truncate=bool(rs.get("truncate", True)),
    )
