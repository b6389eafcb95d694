"""What a user would run instead (issue 5): Hugging Face transformers + accelerate offloading, same model and
budgets. Loads a bf16 checkpoint with device_map="auto", GPU and CPU memory capped and a disk offload folder, then
times prefill and greedy decode. Needs torch, transformers and accelerate (the GPU machine has them; dsjax never
imports torch).

    python3 bench/hf_baseline.py CKPT --gpu-memory 16GiB --cpu-memory 96GiB --offload /tmp/offload --tokens 8
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--gpu-memory", default="16GiB")
    ap.add_argument("--cpu-memory", default="96GiB")
    ap.add_argument("--offload", default="/tmp/hf-offload")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)
    max_memory = {"cpu": args.cpu_memory}
    if torch.cuda.is_available():
        max_memory[0] = args.gpu_memory
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory=max_memory, offload_folder=args.offload,
                                                 attn_implementation="eager")
    load_s = time.perf_counter() - t0
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        if dev != "cpu":
            torch.cuda.synchronize()
        ttft = time.perf_counter() - t0
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.tokens - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        if dev != "cpu":
            torch.cuda.synchronize()
        decode = time.perf_counter() - t0
    placement = {}
    for k, v in getattr(model, "hf_device_map", {}).items():
        placement[str(v)] = placement.get(str(v), 0) + 1
    print(json.dumps({"system": "transformers+accelerate", "load_s": load_s, "ttft_s": ttft,
                      "prefill_tok_s": args.batch * args.prompt_len / ttft,
                      "decode_tok_s": args.batch * (args.tokens - 1) / decode, "device_map_modules": placement,
                      "max_memory": max_memory}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
