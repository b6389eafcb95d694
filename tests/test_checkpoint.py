"""Loading HF checkpoints: lazy safetensors reads, both expert namings, shards, and clear errors for bad input."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsjax
from dsjax.model import forward, random_weights
from dsjax.store.hf_write import hf_tensors, write_hf_checkpoint
from dsjax.store.safetensors_io import Checkpoint, CheckpointError
from model_configs import CONFIGS, config
from tolerances import assert_bf16_close


def _write(path, name="v3", shard_bytes=None, mutate=None, **over):
    cfg = config(name, **over)
    w = random_weights(cfg, seed=7)
    tensors = hf_tensors(cfg, w, dtype=np.float32)
    if mutate:
        mutate(tensors)
    write_hf_checkpoint(str(path), dict(CONFIGS[name], **over), tensors, shard_bytes=shard_bytes)
    return cfg, w


@pytest.fixture(scope="module")
def v3_sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "v3"
    cfg, w = _write(path, shard_bytes=200_000)
    return path, cfg, w


def test_sharded_checkpoint_loads_exactly(v3_sharded):
    path, cfg, w = v3_sharded
    assert os.path.exists(path / "model.safetensors.index.json")
    assert len(Checkpoint(path).files) > 1
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 17))
    got = dsjax.load(path, dtype="float32").logits(ids)
    want = forward(jax.tree.map(jnp.asarray, w), jnp.asarray(ids), cfg)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_fused_expert_names_load_like_per_expert(tmp_path, v3_sharded):
    """transformers v5 fused layout: experts.gate_up_proj [E, 2I, D] (gate rows first), experts.down_proj [E, D, I]."""
    _, cfg, w = v3_sharded

    def fuse(t):
        for i, lw in enumerate(w["layers"]):
            if "experts_gate" not in lw:
                continue
            for e in range(cfg.n_routed_experts):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    del t[f"model.layers.{i}.mlp.experts.{e}.{p}.weight"]
            t[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate(
                [lw["experts_gate"], lw["experts_up"]], axis=1).astype(np.float32)
            t[f"model.layers.{i}.mlp.experts.down_proj"] = lw["experts_down"].astype(np.float32)

    _write(tmp_path / "fused", mutate=fuse)
    ids = np.arange(12)[None]
    np.testing.assert_array_equal(dsjax.load(tmp_path / "fused", dtype="float32").logits(ids),
                                  dsjax.load(v3_sharded[0], dtype="float32").logits(ids))


def test_bf16_load_is_close_to_f32(v3_sharded):
    path, cfg, _ = v3_sharded
    ids = np.arange(20)[None] % cfg.vocab_size
    assert_bf16_close(dsjax.load(path, dtype="bfloat16").logits(ids), dsjax.load(path, dtype="float32").logits(ids),
                      "bf16 vs f32")


def test_mtp_layers_are_ignored(tmp_path):
    """Tensors of layers >= num_hidden_layers (V3's MTP module) are present in checkpoints and skipped."""
    def add_mtp(t):
        t["model.layers.3.eh_proj.weight"] = np.ones((4, 4), np.float32)
        t["model.layers.3.self_attn.kv_b_proj.weight"] = np.ones((3, 3), np.float32)
    cfg, w = _write(tmp_path / "mtp", mutate=add_mtp)
    ids = np.arange(5)[None]
    np.testing.assert_array_equal(dsjax.load(tmp_path / "mtp", dtype="float32").logits(ids),
                                  np.asarray(forward(jax.tree.map(jnp.asarray, w), jnp.asarray(ids), cfg)))


def test_missing_tensor_is_named_with_expected_shape(tmp_path):
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _write(tmp_path / "m", mutate=lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.kv_b_proj\.weight'.*"
                                              r"expected shape \[128, 16\]"):
        dsjax.load(tmp_path / "m", dtype="float32")


def test_missing_expert_is_named(tmp_path):
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    _write(tmp_path / "m", mutate=lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj"):
        dsjax.load(tmp_path / "m", dtype="float32")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    name = "model.layers.0.mlp.gate_proj.weight"
    _write(tmp_path / "s", mutate=lambda t: t.__setitem__(name, np.zeros((95, 64), np.float32)))
    with pytest.raises(CheckpointError, match=r"gate_proj.*\[95, 64\].*expected \[96, 64\]"):
        dsjax.load(tmp_path / "s", dtype="float32")


def test_truncated_shard_is_reported(tmp_path):
    _write(tmp_path / "t", shard_bytes=200_000)
    shard = sorted((tmp_path / "t").glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated: tensor '.+'"):
        dsjax.load(tmp_path / "t", dtype="float32")


def test_missing_shard_and_corrupt_header(tmp_path):
    _write(tmp_path / "x", shard_bytes=200_000)
    shards = sorted((tmp_path / "x").glob("model-*.safetensors"))
    shards[0].unlink()
    with pytest.raises(CheckpointError, match="listed in model.safetensors.index.json is missing"):
        dsjax.load(tmp_path / "x")
    shards[1].write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt header length"):
        Checkpoint(tmp_path / "x").close() if False else dsjax.store.safetensors_io.SafetensorsFile(str(shards[1]))


def test_fp8_and_u8_dtypes_read(tmp_path):
    """The reader maps every DeepSeek dtype (F8_E4M3 via ml_dtypes, which safetensors' numpy API cannot read)."""
    from safetensors.numpy import save_file
    a = np.linspace(-4, 4, 12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.float8_e4m3fn)
    save_file({"w": a, "b": np.arange(6, dtype=np.uint8), "h": np.ones(3, ml_dtypes.bfloat16)},
              str(tmp_path / "model.safetensors"))
    ck = Checkpoint(tmp_path)
    np.testing.assert_array_equal(ck.read("w").view(np.uint8), a.view(np.uint8))
    assert ck.read("b").tolist() == list(range(6)) and ck.read("h").dtype == ml_dtypes.bfloat16
    assert ck.info("w").dtype == "F8_E4M3"


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        dsjax.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["v3"]))
    with pytest.raises(CheckpointError, match="no safetensors files"):
        dsjax.load(tmp_path)
    with pytest.raises(ValueError, match="dtype='float16'"):
        dsjax.load(tmp_path, dtype="float16")


def test_streamed_writer_equals_dict_writer(tmp_path):
    """An iterable of tensors is written shard by shard (checkpoints larger than memory) with the same result."""
    cfg = config("v2_lite")
    tensors = hf_tensors(cfg, random_weights(cfg, seed=3), dtype=np.float32)
    write_hf_checkpoint(str(tmp_path / "d"), CONFIGS["v2_lite"], tensors, shard_bytes=150_000)
    write_hf_checkpoint(str(tmp_path / "g"), CONFIGS["v2_lite"], ((k, v) for k, v in tensors.items()),
                        shard_bytes=150_000)
    a, b = Checkpoint(tmp_path / "d"), Checkpoint(tmp_path / "g")
    assert len(a.files) == len(b.files) > 1 and sorted(a.names()) == sorted(b.names())
    for n in a.names():
        np.testing.assert_array_equal(a.read(n), b.read(n))
