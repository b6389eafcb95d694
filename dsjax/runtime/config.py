"""Runtime configuration: the seed design's presets (memory_config, compute_config) plus memory budgets.

`RuntimeConfig.from_preset("balanced", gpu_memory="16GB", max_gpu_layers=2)` reads configs/<preset>.yaml and applies
overrides; a key in a YAML file or an override that is unknown, of the wrong type or impossible is an error naming
the key. Every key's effect is documented on its field and in configs/README.md.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import yaml

from dsjax.config import ModelConfig
from dsjax.runtime.planner import parse_bytes
from dsjax.runtime.scheduler import DEFAULT_STEP_TOKENS

PRESETS = ("low_latency", "high_throughput", "balanced")
CPU_EXPERTS = ("auto", "on", "off")
AUTO_ON_OFF_KEYS = ("cpu_experts", "compile_ahead")     # compute_config keys taking CPU_EXPERTS' values
EXPERT_COPY = ("put", "jit")


class RuntimeConfigError(ValueError):
    """A runtime configuration key that is unknown, mistyped or impossible; the message names the key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    max_gpu_layers: int = 3          # GPU layer slots that stream the layers not resident on the GPU
    prefetch_layers: int = 2         # how many layers ahead layer weights are copied to the GPU
    disk_prefetch_layers: int = 1    # MoE layers ahead whose predicted experts are read from disk (<= prefetch_layers)
    expert_threshold: float = 0.4    # predicted probability (top_k x share, capped at 1) to prefetch an expert
    min_batch_size: int = 1          # a step's decode rows are padded up to at least this many
    max_batch_size: int = 32         # requests running at once (more wait for a place)
    dynamic_batch: bool = True       # pad a step's rows to the next power of two (True) or always to max_batch_size
    max_context: int = 0             # prompt + output per request; 0 = min(model, 4096, what the KV pool holds)
    step_tokens: int = DEFAULT_STEP_TOKENS   # prompt tokens prefilled per step beside decoding rows (chunks of <= 256)
    preload_experts: bool = True     # fill the host expert cache and GPU expert slots from disk at load
    active_experts: int = 0          # route each token to its top k experts, 1..num_experts_per_tok (fewer bytes per
    #                                  token, at a quality cost: bench/RESULTS.md); 0 = the model's num_experts_per_tok
    hot_experts: int = 0             # experts per MoE layer kept in GPU slots for the engine's life: the most popular
    #                                  of each layer by `popularity` (fewer host->GPU bytes per token, same tokens)
    popularity: str = ""             # JSON file of measured expert activations (engine.save_popularity): chooses the
    #                                  hot experts and the order preload_experts loads in; "" = none


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeConfig:
    enable_fusion: bool = True       # fused FP4 Pallas kernels where the platform has them; else jnp references
    overlap_io: bool = True          # prefetch asynchronously; False loads every weight on demand (the baseline)
    use_cuda_graph: bool = True      # let XLA capture command buffers (CUDA graphs) in each layer executable
    overlap_compute: bool = True     # prefill: read the next expert chunk while the current chunk computes
    use_parallel_compute: bool = True  # shared experts run while the routed experts' weights are being fetched
    auto_tune: bool = False          # measure disk and host->GPU bandwidth at load and plan with them
    adaptive_schedule: bool = True   # adapt prefetch depth and expert_threshold from observed hit rates; no
    #                                  predicted host->GPU copies while steps saturate that link (V3 slice run 8 on
    #                                  the H200: 1.08x / 1.18x / 1.10x decode tok/s at batch 1 / 8 / 32, bench/RESULTS.md)
    cpu_experts: str = "auto"        # decode steps compute some host-resident experts that miss the GPU on the CPU
    #                                  beside the copies (issue 24): auto (a GPU backend, an FP4 store: timed
    #                                  steps per batch bucket keep it where it pays), on (wherever the kernel
    #                                  runs, the CPU backend too), off
    cpu_threads: int = 0             # CPU threads of that path; 0 = every CPU of the process but the engine thread's
    compile_ahead: str = "off"       # when requests join, compile the decode shape they lead to (rows, page-table
    #                                  width) on a thread of its own while they prefill (runtime/compile_ahead.py):
    #                                  off (until measured on a GPU host), on, auto (on with >= 4 CPUs)
    expert_copy: str = "put"         # how an expert that misses the GPU is copied in when its layer needs it: put (a
    #                                  jax.device_put per expert, then one slot write) or jit (the copies inside the
    #                                  slot write's executable: one dispatch; issue 20 item 1, bench/copy_paths.py)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Presets plus budgets. `gpu_memory` / `host_memory` None = no limit (everything on the GPU)."""

    memory_config: MemoryConfig = MemoryConfig()
    compute_config: ComputeConfig = ComputeConfig()
    gpu_memory: int | None = None
    host_memory: int | None = None
    preset: str = "custom"

    @classmethod
    def from_preset(cls, preset: str = "balanced", **overrides: Any) -> "RuntimeConfig":
        """A preset name (or a YAML path) with keyword overrides of any memory/compute key or budget."""
        if os.path.exists(preset):
            path, name = preset, os.path.splitext(os.path.basename(preset))[0]
        elif preset in PRESETS:
            path, name = preset_path(preset), preset
        else:
            raise RuntimeConfigError(f"preset {preset!r} is not known; choose one of {', '.join(PRESETS)} or give "
                                     "a YAML file path")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        return cls.from_dict(raw, source=path, preset=name, **overrides)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", preset: str = "custom",
                  **overrides: Any) -> "RuntimeConfig":
        if not isinstance(raw, dict):
            raise RuntimeConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        sections = {"memory_config": MemoryConfig, "compute_config": ComputeConfig}
        budgets = {"gpu_memory", "host_memory"}
        values: dict[str, dict[str, Any]] = {s: {} for s in sections}
        top: dict[str, Any] = {}
        for key, val in raw.items():
            if key in sections:
                if not isinstance(val, dict):
                    raise RuntimeConfigError(f"{source}: {key} must be a mapping")
                for k, v in val.items():
                    _field(sections[key], k, f"{source}: {key}.{k}")
                    values[key][k] = v
            elif key in budgets:
                top[key] = val
            else:
                raise RuntimeConfigError(f"{source}: unknown key {key!r}; top-level keys are memory_config, "
                                         "compute_config, gpu_memory, host_memory")
        for k, v in overrides.items():
            if k in budgets:
                top[k] = v
                continue
            owner = [s for s, c in sections.items() if k in {f.name for f in dataclasses.fields(c)}]
            if not owner:
                keys = {c: ", ".join(f.name for f in dataclasses.fields(c)) for c in (MemoryConfig, ComputeConfig)}
                raise RuntimeConfigError(f"unknown option {k!r}; options are the keys of memory_config "
                                         f"({keys[MemoryConfig]}), compute_config ({keys[ComputeConfig]}), "
                                         "gpu_memory and host_memory")
            values[owner[0]][k] = v
        built = {s: sections[s](**{k: _check(sections[s], k, v, f"{s}.{k}") for k, v in values[s].items()})
                 for s in sections}
        for b in budgets:
            if top.get(b) is not None:
                try:
                    top[b] = parse_bytes(top[b], b)
                except ValueError as e:
                    raise RuntimeConfigError(str(e)) from None
        cfg = cls(**built, gpu_memory=top.get("gpu_memory"), host_memory=top.get("host_memory"), preset=preset)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        m = self.memory_config
        if m.max_gpu_layers < 1:
            raise RuntimeConfigError(f"memory_config.max_gpu_layers={m.max_gpu_layers} must be >= 1")
        if m.prefetch_layers < 0:
            raise RuntimeConfigError(f"memory_config.prefetch_layers={m.prefetch_layers} must be >= 0")
        if m.disk_prefetch_layers < 0:
            raise RuntimeConfigError(f"memory_config.disk_prefetch_layers={m.disk_prefetch_layers} must be >= 0")
        if not 0.0 <= m.expert_threshold <= 1.0:
            raise RuntimeConfigError(f"memory_config.expert_threshold={m.expert_threshold} must lie in [0, 1]")
        if m.min_batch_size < 1:
            raise RuntimeConfigError(f"memory_config.min_batch_size={m.min_batch_size} must be >= 1")
        if m.max_context < 0:
            raise RuntimeConfigError(f"memory_config.max_context={m.max_context} must be >= 0 (0 = automatic)")
        if m.step_tokens < 1:
            raise RuntimeConfigError(f"memory_config.step_tokens={m.step_tokens} must be >= 1")
        if m.active_experts < 0:
            raise RuntimeConfigError(f"memory_config.active_experts={m.active_experts} must be >= 0 (0 = the model's "
                                     "num_experts_per_tok, else 1..num_experts_per_tok)")
        if m.hot_experts < 0:
            raise RuntimeConfigError(f"memory_config.hot_experts={m.hot_experts} must be >= 0 (0 = no hot set)")
        if m.max_batch_size < m.min_batch_size:
            raise RuntimeConfigError(f"memory_config.max_batch_size={m.max_batch_size} must be >= min_batch_size="
                                     f"{m.min_batch_size}")
        c = self.compute_config
        for key in AUTO_ON_OFF_KEYS:
            if getattr(c, key) not in CPU_EXPERTS:
                raise RuntimeConfigError(f"compute_config.{key}={getattr(c, key)!r} must be one of "
                                         f"{', '.join(CPU_EXPERTS)}")
        if c.expert_copy not in EXPERT_COPY:
            raise RuntimeConfigError(f"compute_config.expert_copy={c.expert_copy!r} must be one of "
                                     f"{', '.join(EXPERT_COPY)}")
        if c.cpu_threads < 0:
            raise RuntimeConfigError(f"compute_config.cpu_threads={c.cpu_threads} must be >= 0 (0 = automatic)")

    def replace(self, **overrides: Any) -> "RuntimeConfig":
        raw = {"memory_config": dataclasses.asdict(self.memory_config),
               "compute_config": dataclasses.asdict(self.compute_config),
               "gpu_memory": self.gpu_memory, "host_memory": self.host_memory}
        return RuntimeConfig.from_dict(raw, preset=self.preset, **overrides)


def active_experts_config(cfg: ModelConfig, k: int) -> ModelConfig:
    """The model config an engine runs for memory_config.active_experts = k: the model's own (k = 0 or its
    num_experts_per_tok), else one routing each token to its top k (ModelConfig.with_top_k). Every engine kind builds
    its programs, bookkeeping and plan from the config this returns, so all of them see k.

    Example:
        >>> active_experts_config(cfg, 2).num_experts_per_tok      # a top-4 model routed to its top 2
        2
    """
    where = "memory_config.active_experts"
    if isinstance(k, bool) or not isinstance(k, int):
        raise RuntimeConfigError(f"{where}={k!r} has the wrong type; expected int (0 = the model's "
                                 "num_experts_per_tok)")
    K = cfg.model_top_k
    if k == 0:
        return cfg if cfg.model_experts_per_tok is None else cfg.with_top_k(K)
    if not cfg.has_moe:
        raise RuntimeConfigError(f"{where}={k}: this model has no routed experts; leave active_experts at 0")
    if not 1 <= k <= K:
        raise RuntimeConfigError(f"{where}={k} is outside 1..{K}: this model routes each token to "
                                 f"num_experts_per_tok={K} experts; choose k in 1..{K} (0 = all {K})")
    return cfg.with_top_k(k)


def routing_report(cfg: ModelConfig) -> dict[str, Any]:
    """stats()["routing"]: the experts each token is routed to, the model's own number, and a note when
    active_experts lowered it."""
    out: dict[str, Any] = {"active_experts": cfg.num_experts_per_tok or 0, "model_experts_per_tok": cfg.model_top_k}
    if cfg.has_moe and cfg.num_experts_per_tok < cfg.model_top_k:
        out["note"] = (f"active_experts={cfg.num_experts_per_tok} is below the model's num_experts_per_tok="
                       f"{cfg.model_top_k}: fewer routed-expert bytes per token, at a quality cost (bench/RESULTS.md, "
                       "'Fewer active experts')")
    return out


def preset_path(name: str) -> str:
    """Path of a shipped preset (configs/ of the source tree, or the installed dsjax_configs package)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
    candidate = os.path.join(here, f"{name}.yaml")
    if os.path.exists(candidate):
        return candidate
    from importlib import resources
    return str(resources.files("dsjax_configs").joinpath(f"{name}.yaml"))


def _field(cls, key: str, where: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f
    raise RuntimeConfigError(f"{where}: unknown key; valid keys: {', '.join(f.name for f in dataclasses.fields(cls))}")


def _check(cls, key: str, value: Any, where: str) -> Any:
    typ = typing.get_type_hints(cls)[key]
    if typ is str and isinstance(value, bool) and key in AUTO_ON_OFF_KEYS:
        value = "on" if value else "off"           # YAML 1.1 (and so --set cpu_experts=on) reads on/off as booleans
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise RuntimeConfigError(f"{where}={value!r} has the wrong type; expected {typ.__name__}")
    return value
