"""The kernels' Triton lowering, checked on a CPU host for an abstract H200: every default tile config at the
issue's DeepSeek-V3 shapes and every config the GPU tests run goes through Pallas' JAX -> Triton-IR lowering
(`lower(lowering_platforms=("cuda",))` under an abstract mesh whose device is an "NVIDIA H200").

This catches, in CI, what the interpreter cannot: a primitive or argument the Triton lowering rejects (kernel run 9
lost a GPU call to `cache_modifier=".cg"`, which jax 0.11.2's lowering cannot map). It does not compile the Triton
module (that needs the CUDA plugin): register spills, ptxas errors and wrong results stay the GPU tests' job.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from dsjax_kernels.fp4_matmul import default_config, fp4_matmul
from dsjax_kernels.moe_gmm import expert_swiglu, moe_gmm
from dsjax_kernels.moe_gmm.kernel import default_config as default_grouped
from test_fp4_matmul import GPU_CASES as DENSE_GPU_CASES
from test_moe_gmm import GPU_CASES as GROUPED_GPU_CASES, VARIANTS

H200 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                    abstract_device=AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu"))
BS = {"nvfp4": 16, "mxfp4": 32}
V3 = [(7168, 2048), (2048, 7168)]                                  # (K, N): gate/up and down


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def lower_for_h200(fn, *args) -> str:
    """StableHLO text of fn(*args) lowered for CUDA on an abstract H200 (no GPU needed); the Pallas kernels appear
    as Triton custom calls."""
    with jax.sharding.use_abstract_mesh(H200):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def weight(lead, n, k, fmt):
    return (sds((*lead, n, k // 2), jnp.uint8), sds((*lead, n, k // BS[fmt]), jnp.uint8),
            sds(tuple(lead), jnp.float32))


def assert_triton(text: str, what: str, count: int = 1):
    found = text.count("__gpu$xla.gpu.triton")
    assert found == count, f"{what}: {found} Triton custom calls in the lowered module, expected {count}"


DENSE = ([(m, n, k, None, fmt) for m in (1, 8, 32, 256, 4096) for k, n in V3 for fmt in ("nvfp4", "mxfp4")]
         + [(m, n, k, cfg, "nvfp4") for m, n, k, cfg in DENSE_GPU_CASES])


@pytest.mark.parametrize("m,n,k,cfg,fmt", DENSE,
                         ids=[f"{m}-{n}-{k}-{i}-{f}" for i, (m, n, k, _, f) in enumerate(DENSE)])
def test_dense_lowers_for_h200(m, n, k, cfg, fmt):
    p, s, g = weight((), n, k, fmt)
    text = lower_for_h200(lambda x, p, s, g: fp4_matmul(x, p, s, g, fmt=fmt, config=cfg),
                          sds((m, k), jnp.bfloat16), p, s, g)
    assert_triton(text, f"dense M={m} N={n} K={k} {cfg or default_config(m, n, k)}")


GROUPED = ([(experts, rows, n, k, variant) for experts, rows in ((8, 33), (64, 295), (64, 4067)) for k, n in V3
            for variant in (None, "split_w_lhs8", "slots_w_lhs8")]
           + [(len(sizes), sum(sizes) + extra, n, k, variant) for sizes, extra, n, k in GROUPED_GPU_CASES
              for variant in VARIANTS])


@pytest.mark.parametrize("experts,rows,n,k,variant", GROUPED,
                         ids=[f"{e}e-{r}-{n}-{k}-{v}" for e, r, n, k, v in GROUPED])
def test_grouped_lowers_for_h200(experts, rows, n, k, variant):
    cfg = default_grouped(rows, n, k, experts)
    if variant is not None:
        cfg = dataclasses.replace(cfg, **VARIANTS[variant])
        if cfg.decode == "ptx" or cfg.x_pairs:
            cfg = dataclasses.replace(cfg, x_split=True)
        if cfg.split_k > 1 and (k // 2 // cfg.bkh) % cfg.split_k:
            cfg = dataclasses.replace(cfg, split_k=1)      # the split does not divide this K: the plain tiles
    p, s, g = weight((experts,), n, k, "nvfp4")
    text = lower_for_h200(lambda x, p, s, g, sz: moe_gmm(x, p, s, g, sz, fmt="nvfp4", config=cfg),
                          sds((rows, k), jnp.bfloat16), p, s, g, sds((experts,), jnp.int32))
    assert_triton(text, f"grouped {experts}e x {rows} rows N={n} K={k} {cfg}")


@pytest.mark.parametrize("experts,rows", [(8, 33), (64, 295), (64, 4067)])
def test_swiglu_lowers_for_h200(experts, rows):
    d, i = 7168, 2048
    gate, up = weight((experts,), i, d, "nvfp4"), weight((experts,), i, d, "nvfp4")
    down = weight((experts,), d, i, "nvfp4")
    text = lower_for_h200(lambda x, g, u, dn, sz: expert_swiglu(x, g, u, dn, sz, fmt="nvfp4"),
                          sds((rows, d), jnp.bfloat16), gate, up, down, sds((experts,), jnp.int32))
    assert_triton(text, f"expert_swiglu {experts}e x {rows} rows", count=2)
