"""Synthetic stores (benchmark models at real width without a checkpoint): deterministic, bit-for-bit NVFP4 as
generated, complete, and runnable."""

import filecmp
import os

import numpy as np

import dsjax
from dsjax.config import ModelConfig
from dsjax.runtime.planner import ModelBytes
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.reader import Store
from dsjax.store.synthetic import E4M3_NEAR_ONE, SyntheticSource, v3_slice_config
from dsjax.store.verify import verify
from dsjax.store.writer import convert
from model_configs import CONFIGS

CFG = dict(CONFIGS["v3"], architectures=["DeepseekV3ForCausalLM"])


def _make(tmp_path, name, seed=1):
    src = SyntheticSource(CFG, tmp_path / f"{name}-src", policy="mlp", seed=seed)
    convert(src, tmp_path / name, fmt="nvfp4", policy="mlp", progress=False)
    return src, str(tmp_path / name)


def test_deterministic_and_verified(tmp_path):
    _, a = _make(tmp_path, "a")
    _, b = _make(tmp_path, "b")
    _, c = _make(tmp_path, "c", seed=2)
    assert verify(a).problems == []
    shard = os.path.join("experts", "layer_001", "gate", "packed")
    files = [os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs]
    assert files and all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in files)
    assert any(not filecmp.cmp(os.path.join(a, f), os.path.join(c, f), shallow=False)
               for f in files if f.startswith(shard))


def test_fp4_stored_bit_for_bit_and_runs(tmp_path):
    src, store = _make(tmp_path, "s")
    s = Store(store)
    got = s.read_experts(2, [5])["up"].result()
    want = src.read(src.expert_ref(2, "experts_up", 5))
    np.testing.assert_array_equal(got["packed"][0], want.packed)
    np.testing.assert_array_equal(got["scales"][0], want.scales)
    assert s.manifest.tensors["layers.1.q_a"].dtype == "bfloat16"          # attention stays bf16 under mlp
    e = dsjax.load(store, dtype="float32")
    logits = e.logits(np.arange(12)[None])
    assert np.all(np.isfinite(logits)) and 0.2 < logits.std() < 5          # weights have a sane spread
    assert len(e.generate([1, 2, 3], max_new_tokens=4, stop_token_ids=()).token_ids) == 4


def test_v3_slice_has_v3_layer_sizes():
    cfg = ModelConfig.from_dict(v3_slice_config(6))
    mb = ModelBytes.from_config(cfg, "nvfp4", "mlp")
    v3 = ModelBytes.from_config(ModelConfig.from_dict(v3_slice_config(60, num_hidden_layers=61,
                                                                       first_k_dense_replace=3)), "nvfp4", "mlp")
    assert mb.expert == v3.expert and mb.layer_core[3] == v3.layer_core[10]
    assert 40e9 < mb.total < 48e9                                           # fits the GPU machine's 64 GB disk


def test_store_bytes_match_the_planner(tmp_path):
    _, store = _make(tmp_path, "p")
    analytic = ModelBytes.from_config(ModelConfig.from_dict(CFG), "nvfp4", "mlp")
    stored = model_bytes_from_store(Store(store))
    assert stored.expert == analytic.expert and stored.layer_core == analytic.layer_core


def test_generation_threads_and_converter_workers_do_not_change_the_store(tmp_path, monkeypatch):
    """Many small row blocks (each its own random stream) generated on 1 or 4 threads, converted with 1 or 4
    workers: the same store, byte for byte."""
    from ckpt_builders import assert_same_files
    from dsjax.store import synthetic
    monkeypatch.setattr(synthetic, "BLOCK_BYTES", 4096)
    for workers in (1, 4):
        src = SyntheticSource(CFG, tmp_path / f"src{workers}", policy="mlp", seed=1, workers=workers)
        convert(src, tmp_path / f"w{workers}", fmt="nvfp4", policy="mlp", progress=False, workers=workers)
    assert_same_files(tmp_path / "w1", tmp_path / "w4")


def test_generated_weights_have_the_intended_statistics(tmp_path):
    """bf16 weights N(0, 1/fan_in), norms 1 + N(0, 0.05^2), router bias N(0, 0.01^2); FP4 codes uniform over all 16
    nibbles and block scales spread over E4M3 0.75..1.25, whose dequantized RMS is ~1/sqrt(fan_in)."""
    from dsjax.quant import dequantize_np
    src = SyntheticSource(v3_slice_config(1, n_routed_experts=16), tmp_path / "src", policy="mlp", workers=2)
    try:
        q_b = src.read(src.layer_ref(1, "q_b")).astype(np.float64)                 # [24576, 1536] bf16
        assert abs(q_b.mean()) < 1e-4 and abs(np.sqrt(np.mean(q_b ** 2)) * np.sqrt(1536) - 1) < 0.01
        norm = src.read(src.layer_ref(1, "attn_norm")).astype(np.float64)
        assert abs(norm.mean() - 1) < 0.005 and abs(norm.std() - 0.05) < 0.005
        router = src.read(src.layer_ref(1, "router")).astype(np.float64)             # [16, 7168] float32
        assert abs(np.sqrt(np.mean(router ** 2)) * np.sqrt(7168) - 1) < 0.02
        bias = src.read(src.layer_ref(1, "router_bias"))
        assert bias.dtype == np.float32 and np.all(np.abs(bias) < 0.05)
        q = src.read(src.expert_ref(1, "experts_down", 0))                           # [7168, 2048] NVFP4
        nibbles = np.concatenate([q.packed.ravel() & 15, q.packed.ravel() >> 4])
        assert np.all(np.abs(np.bincount(nibbles, minlength=16) / nibbles.size - 1 / 16) < 0.002)
        assert np.array_equal(np.unique(q.scales), E4M3_NEAR_ONE)
        rms = np.sqrt(np.mean(dequantize_np(q).astype(np.float64) ** 2)) * np.sqrt(2048)
        assert 0.9 < rms < 1.15
    finally:
        src.close()
