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
from dsjax.store.synthetic import SyntheticSource, v3_slice_config
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
