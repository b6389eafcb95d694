"""Quantization policies: which weight keys (dsjax/model/weights.py) a conversion turns into FP4.

    experts       routed experts only
    mlp           routed experts, shared experts and dense MLPs (the default; DESIGN.md §3)
    all           mlp + the attention projections (q / q_a / q_b, kv_a, kv_b, o)
    all+lm_head   all + the output head

Routers (and their bias), norms and the embedding are never FP4: they are small, and routing decisions and the
residual stream are the most quantization-sensitive parts of the model. lm_head is FP4 only under `all+lm_head`.

A key the policy selects still stays bf16 when its input dim K is not a multiple of the format's block size (16 for
NVFP4, 32 for MXFP4); `decide` returns the reason, which the manifest records. Sizes for V3 (671B): attention is
22.8 GB in bf16 and 6.4 GB in FP4, so on a 16 GB GPU only `all` keeps every layer's attention resident.
"""

from __future__ import annotations

import dataclasses

from dsjax.quant import BLOCK_SIZES

EXPERT_KEYS = frozenset({"experts_gate", "experts_up", "experts_down"})
MLP_KEYS = EXPERT_KEYS | {"shared_gate", "shared_up", "shared_down", "gate", "up", "down"}
ATTENTION_KEYS = frozenset({"q", "q_a", "q_b", "kv_a", "kv_b", "o"})

POLICIES: dict[str, frozenset[str]] = {
    "experts": EXPERT_KEYS,
    "mlp": frozenset(MLP_KEYS),
    "all": frozenset(MLP_KEYS | ATTENTION_KEYS),
    "all+lm_head": frozenset(MLP_KEYS | ATTENTION_KEYS | {"lm_head"}),
}
DEFAULT_POLICY = "mlp"
FORMATS = tuple(sorted(BLOCK_SIZES))


@dataclasses.dataclass(frozen=True)
class Decision:
    fp4: bool
    note: str | None = None   # why a selected key stays bf16


def check(fmt: str, policy: str) -> None:
    """Raise ValueError naming the valid choices for an unknown format or policy."""
    if fmt not in BLOCK_SIZES:
        raise ValueError(f"format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not known; choose one of {', '.join(POLICIES)}")


def decide(key: str, shape: tuple[int, ...], fmt: str, policy: str) -> Decision:
    """Whether weight `key` of logical shape [..., N, K] is stored in FP4 under (fmt, policy)."""
    check(fmt, policy)
    if key not in POLICIES[policy]:
        return Decision(False)
    k, bs = shape[-1], BLOCK_SIZES[fmt]
    if k % bs:
        return Decision(False, f"kept bf16: input dim K={k} is not a multiple of the {fmt} block size {bs}")
    return Decision(True)
