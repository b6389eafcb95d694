"""The training script for the embedded model (checkpoints/train_tiny.py) on a toy corpus: the loss falls, the
balancing bias follows DeepSeek-V3's rule exactly, and the exported checkpoint is the trained model."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsjax
from dsjax.config import ModelConfig
from dsjax.demo import SONNET

pytest.importorskip("optax", reason="training needs optax (the dev extra)")
spec = importlib.util.spec_from_file_location(
    "train_tiny", os.path.join(os.path.dirname(os.path.dirname(__file__)), "checkpoints", "train_tiny.py"))
train_tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_tiny)

SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16,
             qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
             rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
                               beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    lines = SONNET.splitlines()
    for k in range(9):                     # nine "plays": rotations of the sonnet, so the split holds one out
        (d / f"play{k}_gut.txt").write_text("\n".join(lines[k:] + lines[:k]) * 6)
    (d / "play0_gut_f.txt").write_text("folio variants are not read")
    return train_tiny.load_corpus(str(d))


def test_corpus_and_split(corpus):
    assert sorted(corpus) == [f"play{k}" for k in range(9)]
    train, valid, held = train_tiny.split_plays(corpus)
    assert sorted(held) == ["play7"] and sorted(valid) == ["play3"] and len(train) == 7
    assert not set(train) & (set(valid) | set(held))


def test_balancing_bias_follows_the_rule():
    import optax
    cfg_dict = train_tiny.model_config(300, **SMALL)
    cfg = ModelConfig.from_dict(cfg_dict)
    w = jax.tree.map(jnp.asarray, train_tiny.random_weights(cfg, seed=0, std=0.02))
    opt = optax.masked(optax.adamw(1e-3), train_tiny.bias_mask(w))
    step = train_tiny.make_step(cfg, opt, bias_speed=0.01)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (4, 17)))
    w2, _, _, loads = step(w, opt.init(w), ids)
    for i, load in zip([1, 2, 3], loads):
        load = np.asarray(load, np.float32)
        delta = np.asarray(w2["layers"][i]["router_bias"]) - np.asarray(w["layers"][i]["router_bias"])
        np.testing.assert_allclose(delta, 0.01 * np.sign(load.mean() - load), atol=1e-7)
        assert load.sum() == 4 * 16 * cfg.num_experts_per_tok
    assert not np.array_equal(np.asarray(w2["layers"][1]["router"]), np.asarray(w["layers"][1]["router"]))


def test_train_export_roundtrip(corpus, tmp_path):
    out = str(tmp_path / "ckpt")
    r, w = train_tiny.train(corpus, out, steps=40, batch=8, seq=32, lr=1e-2, vocab_size=300, config_over=SMALL,
                            log_every=10, eval_every=20, eval_windows_n=8)
    curve = [c["loss"] for c in r["curve"]]
    assert curve[-1] < curve[0] - 0.5                  # it learns
    assert r["heldout_loss"] < curve[0]
    # the exported weights are the validation-best of the evaluated steps
    assert [v["step"] for v in r["valid_curve"]] == [20, 40]
    assert r["valid_loss"] == min(v["valid_loss"] for v in r["valid_curve"])
    assert r["best_step"] == min(r["valid_curve"], key=lambda v: v["valid_loss"])["step"]
    engine = dsjax.load(out, dtype="float32")
    ids = np.asarray([engine.tokenizer.encode("Shall I compare thee to a summer's day?")])
    # The checkpoint is the trained model: the logits of its bf16 weights are those of the trained weights rounded
    # to bf16 (routers and bias stay float32), computed by the training forward.
    assert engine.tokenizer.vocab_size == r["config"]["vocab_size"]
    cfg = ModelConfig.from_dict(r["config"])
    rounded = {k: (v if k == "layers" else jnp.asarray(np.asarray(v).astype(ml_dtypes.bfloat16), jnp.float32))
               for k, v in w.items()}
    rounded["layers"] = [{k: v if k in ("router", "router_bias")
                          else jnp.asarray(np.asarray(v).astype(ml_dtypes.bfloat16), jnp.float32)
                          for k, v in lw.items()} for lw in w["layers"]]
    want = np.asarray(train_tiny.forward_train(rounded, jnp.asarray(ids), cfg)[0])
    got = engine.logits(ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    g = engine.generate("Shall I compare", max_new_tokens=8)
    assert len(g.token_ids) >= 1 and isinstance(g.text, str)
    assert np.isfinite(engine.logits(ids)).all()
