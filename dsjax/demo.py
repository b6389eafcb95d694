"""The embedded default model and the random test model.

`EMBEDDED` is a small DeepSeek-V3-architecture model trained on Shakespeare by `checkpoints/train_tiny.py` (MLA,
grouped sigmoid routing, 16 routed experts top-4 + a shared one, YaRN; ~10.7M parameters, bf16, with its BPE
tokenizer), shipped inside the package so the demo needs no download; `dsjax demo` converts it to an NVFP4 store on
first use. `write_demo_checkpoint` generates a tiny model with random weights and a tokenizer trained on one sonnet:
fast and deterministic, for tests of code paths where the text does not matter.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.weights import random_weights
from dsjax.store.hf_write import hf_tensors, write_hf_checkpoint

EMBEDDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare-v3-tiny")
SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
# DeepSeek-V3's chat format, reduced to what the demo needs.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
                 "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


def demo_config_dict(vocab_size: int) -> dict:
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=vocab_size,
        hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, topk_method="noaux_tc", scoring_func="sigmoid",
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        torch_dtype="bfloat16")


def train_tokenizer(vocab_size: int = 512):
    """Byte-level BPE on the embedded sonnet (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SONNET] * 4, trainer=trainer)
    return tok


def write_demo_checkpoint(dst: str, seed: int = 0) -> str:
    """Write the tiny checkpoint (config.json, model.safetensors bf16, tokenizer files) to dst atomically."""
    tok = train_tokenizer()
    cfg_dict = demo_config_dict(tok.get_vocab_size())
    cfg = ModelConfig.from_dict(cfg_dict)
    tensors = hf_tensors(cfg, random_weights(cfg, seed=seed, dtype=np.float32))

    def tokenizer_files(d: str) -> None:
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(dict(bos_token=SPECIALS[0], eos_token=SPECIALS[1], add_bos_token=True,
                           chat_template=CHAT_TEMPLATE), f, indent=2, ensure_ascii=False)

    return write_hf_checkpoint(dst, cfg_dict, tensors, extra_files=tokenizer_files)


def cache_dir() -> str:
    return os.environ.get("DSJAX_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "dsjax")


def embedded_checkpoint() -> str:
    """The shipped Shakespeare model's directory (read-only; a Hugging Face checkpoint)."""
    if not os.path.exists(os.path.join(EMBEDDED, "model.safetensors")):
        raise FileNotFoundError(f"{EMBEDDED}: the embedded model is missing from this installation; reinstall dsjax "
                                "(the package data dsjax/data/shakespeare-v3-tiny/* must be included)")
    return EMBEDDED


def _fingerprint(path: str) -> str:
    st = os.stat(os.path.join(path, "model.safetensors"))
    return f"{st.st_size}-{int(st.st_mtime)}"


def ensure_demo_store(store: str | None = None, checkpoint: str | None = None) -> str:
    """A checkpoint (default: the embedded model) as an NVFP4 store, converted on first use into `store` (default
    in DSJAX_HOME or ~/.cache/dsjax) and rebuilt when the checkpoint changed since."""
    import shutil
    from dsjax.store.writer import convert
    path = checkpoint or embedded_checkpoint()
    store = store or os.path.join(cache_dir(), os.path.basename(path.rstrip("/")) + "-nvfp4")
    manifest, stamp = os.path.join(store, "manifest.json"), os.path.join(store, "DSJAX_SOURCE")
    if os.path.exists(manifest) and not (os.path.exists(stamp) and open(stamp).read() == _fingerprint(path)
                                         and _sealed(manifest)):
        shutil.rmtree(store)        # made from another version of the checkpoint, or by a dsjax before sealed manifests
    if not os.path.exists(manifest):
        convert(path, store, fmt="nvfp4", policy="mlp", progress=False)
        with open(stamp, "w") as f:
            f.write(_fingerprint(path))
    return store


def _sealed(manifest: str) -> bool:
    from dsjax.store.manifest import MANIFEST_CHECKSUM
    try:
        with open(manifest) as f:
            return MANIFEST_CHECKSUM in json.load(f)
    except (OSError, ValueError):
        return False


def demo_budgets(store: str) -> dict:
    """Budgets that make all three tiers of a store work: the GPU minimum with one layer slot and one layer of
    prefetch; a host budget whose cache holds about half of each layer's experts (the rest come from disk)."""
    from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory, plan
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    st = Store(store)
    mb = model_bytes_from_store(st)
    tight = dict(max_gpu_layers=1, prefetch_layers=1)
    context = min(4096, st.config.max_position_embeddings)     # the KV cache the engine allocates
    gpu = minimum_gpu_memory(mb, context_tokens=context, **tight)
    host = minimum_host_memory(mb)
    while plan(mb, gpu, host, context_tokens=context, **tight).host_experts < mb.n_experts // 2:
        host += max(mb.expert, 1)
    return dict(gpu_memory=gpu, host_memory=host, **tight)


@contextlib.contextmanager
def compile_seconds():
    """Seconds JAX spends lowering and compiling (or loading from the persistent cache) inside the block, from JAX's
    monitoring events: yields a one-element list that holds the running total."""
    import jax
    from dsjax.runtime.engine import COMPILE_EVENTS
    total = [0.0]

    def listener(event: str, seconds: float, **_) -> None:
        if event in COMPILE_EVENTS:
            total[0] += seconds

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}" + ("" if k == 1 else "s")


def run_demo(store_dir: str | None = None, *, dtype: str = "float32", max_new_tokens: int = 48, out=None) -> int:
    """`dsjax demo`: the embedded model -> an NVFP4 store -> generation under budgets that make all three tiers work,
    then what moved over each link. Returns the exit code."""
    import jax
    import dsjax
    from dsjax.runtime.planner import fmt_bytes
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    out = out or sys.stdout

    def say(*a, **kw):
        print(*a, file=out, flush=True, **kw)

    t0 = time.perf_counter()
    path = embedded_checkpoint()
    store = ensure_demo_store(store_dir)
    mb = model_bytes_from_store(Store(store))
    budgets = demo_budgets(store)
    gpu, host = budgets["gpu_memory"], budgets["host_memory"]
    with open(os.path.join(path, "training.json")) as f:
        tr = json.load(f)
    say(f"[dsjax demo] embedded model: DeepSeek-V3 architecture trained on Shakespeare ({path}; held-out plays "
        f"perplexity {tr['heldout_ppl']:.1f} in bf16),\n"
        f"             converted to an NVFP4 store of {fmt_bytes(mb.total)} ({store})")
    if jax.default_backend() == "cpu":
        say("[dsjax demo] no GPU here: the 'GPU' and 'pinned host' tiers are stand-ins in CPU memory (same code "
            "paths and byte counts; on a GPU they are HBM and page-locked host RAM)")
    engine = dsjax.load(store, dtype=dtype, preset="balanced", **budgets)
    cfg, p = engine.config, engine.placement
    say(f"[dsjax demo] {cfg.num_hidden_layers} layers ({', '.join(cfg.layer_kinds)}), {cfg.n_routed_experts} "
        f"routed experts (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups), MLA latent {cfg.kv_lora_rank}+"
        f"{cfg.qk_rope_head_dim}, vocab {cfg.vocab_size}; ready in {time.perf_counter() - t0:.1f} s")
    say(f"[dsjax demo] budgets GPU {fmt_bytes(gpu)}, host {fmt_bytes(host)}: {_n(len(p.resident_layers), 'layer')} "
        f"resident, {_n(p.ring_slots, 'GPU layer slot')} for streaming the rest, "
        f"{_n(engine.experts.slots.capacity, 'GPU expert slot')}, {p.host_experts} experts per layer in pinned host, "
        "the rest on disk")
    for i, prompt in enumerate(["MACBETH.\nIs this a dagger", "ROMEO.\nBut soft, what light"]):
        say(f"\n>>> {prompt}", end="")
        first = None                    # (seconds to the first token, seconds of it spent compiling)
        t_prompt = time.perf_counter()
        with compile_seconds() as compiled:
            for ev in engine.stream(prompt, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=0):
                if first is None:
                    first = (time.perf_counter() - t_prompt, compiled[0])
                say(ev.text, end="")
        say()
        g = engine.stats()["generation"]
        say(f"[dsjax] prompt tokens {g.get('prompt_tokens')}, generated {g.get('generated_tokens')}, time to first "
            f"token {g.get('ttft_s', 0) * 1e3:.1f} ms, decode {g.get('decode_tok_s', 0):.1f} tok/s")
        if i == 0 and first is not None and first[1] > 0:
            say(f"[dsjax demo] this first call waited {first[0] * 1e3:.0f} ms for its first token, "
                f"{first[1] * 1e3:.0f} ms of it compiling (XLA compiles each kind of layer once, on first use); the "
                "next prompt shows the steady state")
    s = engine.stats()
    links = ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB in {v['copies']} copies" for k, v in s["links"].items())
    pr = s["prediction"]
    say(f"\n[dsjax demo] moved: {links}")
    if "stage->pinned" in s["links"]:
        say("             (stage->pinned: expert bytes read from disk into plain host buffers, then copied into "
            "pinned host memory, which is what the host->GPU link can read at full speed)")
    say(f"[dsjax demo] hit rates: GPU {s['hit_rates']['gpu']:.2f}, host {s['hit_rates']['host']:.2f}; "
        f"next-layer prediction precision {pr['precision']:.2f}, recall {pr['recall']:.2f}; "
        f"{s['prefetch']['used']} of {s['prefetch']['copies']} experts copied ahead were used; "
        f"stalled on weights {s['stall_seconds'] * 1e3:.0f} ms")
    g = engine.generate("Speak, what news?", chat=True, max_new_tokens=8)
    say(f"[dsjax demo] chat template prompt: {engine.tokenizer.decode(g.prompt_ids, False)!r}")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in budgets.items())
    say(f"[dsjax demo] done in {time.perf_counter() - t0:.1f} s; try `dsjax plan {store} {flags}` (this run's "
        f"placement) and `dsjax generate {store} --prompt 'ROMEO.' --stats`")
    engine.close()
    return 0
