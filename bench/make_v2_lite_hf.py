"""Write a DeepSeek-V2-Lite-shaped Hugging Face checkpoint (bf16, random weights) for the comparison with
transformers + accelerate offloading (issue 5): 27 layers, hidden 2048, 64 routed + 2 shared experts of 1408, top-6,
MLA without q_lora, vocab 102400 (about 31 GB). Generated on --workers threads in order and written shard by shard
(memory ~ one shard + 2 x workers tensors); deterministic per seed, whatever --workers. Convert it for dsjax with
`dsjax convert DST STORE --format nvfp4`.

    python bench/make_v2_lite_hf.py /data/v2-lite-shaped [--layers 27] [--workers 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dsjax.store.hf_write import write_hf_checkpoint  # noqa: E402
from dsjax.store.synthetic import SyntheticSource  # noqa: E402
from dsjax.store.writer import default_workers, map_ordered  # noqa: E402


def v2_lite_config(layers: int = 27, **over) -> dict:
    """V2-Lite's hub config values (reference/deepseek-spec.md §1)."""
    cfg = dict(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400,
               hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=layers,
               first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
               scoring_func="softmax", routed_scaling_factor=1.0, norm_topk_prob=False, rope_theta=10000.0,
               rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                 beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
               max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=100000,
               eos_token_id=100001, torch_dtype="bfloat16", moe_layer_freq=1, aux_loss_alpha=0.001)
    cfg.update(over)
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help=f"threads generating tensors (default {default_workers()}: cores, at most 16)")
    args = ap.parse_args(argv)
    raw = v2_lite_config(args.layers, n_routed_experts=args.experts)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        src = SyntheticSource(raw, work, policy=None, seed=args.seed, workers=args.workers)   # all bf16 / float32
        try:
            tensors = map_ordered(lambda ref: (ref.name, src.read(ref)), src.refs(), args.workers)
            write_hf_checkpoint(args.dst, raw, tensors, shard_bytes=int(args.shard_gb * 1e9))
        finally:
            src.close()
    size = sum(os.path.getsize(os.path.join(args.dst, f)) for f in os.listdir(args.dst))
    dt = time.perf_counter() - t0
    print(f"wrote {args.dst}: {size / 1e9:.2f} GB in {dt:.0f} s ({size / 1e6 / dt:.0f} MB/s, {args.workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
