"""`dsjax convert` and `dsjax verify`: thin argparse front-ends over dsjax.store.writer and dsjax.store.verify.

Exit codes: 0 success; 1 `verify` found problems (each printed with the tensor's name); 2 bad input or destination
(the message says what and how to fix it, printed by dsjax.cli.main); 130 interrupted (re-run to resume).
"""

from __future__ import annotations

import argparse
import sys
import time

from dsjax.store.policy import DEFAULT_POLICY, FORMATS, POLICIES


def cmd_convert(args: argparse.Namespace) -> int:
    from dsjax.store.writer import convert
    t0 = time.perf_counter()
    try:
        m = convert(args.src, args.dst, fmt=args.fmt, policy=args.policy, progress=not args.no_progress,
                    workers=args.workers)
    except KeyboardInterrupt:
        print(f"\ndsjax: interrupted; re-run the same command to resume the conversion into {args.dst}",
              file=sys.stderr)
        return 130
    t = m.totals()
    dt = time.perf_counter() - t0
    fp4 = sum(1 for r in m.tensors.values() if r.is_fp4)
    print(f"{args.dst}: {len(m.tensors)} tensors ({fp4} in {m.fmt}, policy {m.policy}), {t['bytes'] / 1e9:.3f} GB "
          f"(core {t['core_bytes'] / 1e9:.3f} GB, routed experts {t['expert_bytes'] / 1e9:.3f} GB) in {dt:.1f} s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from dsjax.store.manifest import StoreCorruptError
    from dsjax.store.verify import verify
    try:
        rep = verify(args.store)
    except StoreCorruptError as e:      # a damaged or edited manifest.json is a problem found, not bad input
        print(f"{args.store}: 1 problem(s)\n  {e}")
        return 1
    print(rep.summary())
    return 0 if rep.ok else 1


def add_parsers(subparsers) -> None:
    """Add the `convert` and `verify` subcommands to the dsjax CLI's subparsers."""
    c = subparsers.add_parser(
        "convert", help="convert a Hugging Face checkpoint into a dsjax FP4 store",
        description="Stream a Hugging Face DeepSeek checkpoint (bf16/fp32, DeepSeek FP8-block or ModelOpt NVFP4) "
                    "into a dsjax store, tensor by tensor. Resumable: re-run the same command after an "
                    "interruption and it continues where it stopped.")
    c.add_argument("src", metavar="SRC", help="checkpoint directory (config.json, *.safetensors, tokenizer files)")
    c.add_argument("dst", metavar="DST", help="store directory to create (new, empty, or an unfinished conversion "
                                              "of the same SRC, format and policy)")
    c.add_argument("--format", dest="fmt", choices=FORMATS, default="nvfp4",
                   help="FP4 format: nvfp4 (E4M3 scale per 16 + FP32 per matrix) or mxfp4 (E8M0 scale per 32); "
                        "default nvfp4")
    c.add_argument("--policy", choices=list(POLICIES), default=DEFAULT_POLICY,
                   help="which tensors become FP4: experts (routed experts), mlp (+ shared experts and dense MLPs; "
                        "default), all (+ attention), all+lm_head (+ output head)")
    c.add_argument("--no-progress", action="store_true", help="do not show the progress bar (bytes and MB/s)")
    c.add_argument("--workers", type=int, default=None,
                   help="threads converting tensors and experts (default: cores, at most 16); the store is the same "
                        "for any value, memory grows with it")
    c.set_defaults(fn=cmd_convert)

    v = subparsers.add_parser(
        "verify", help="re-read a dsjax store and check every checksum and shape",
        description="Re-read every file, core tensor and routed expert of a store and compare it with the manifest. "
                    "Exit 0 when all match, 1 with one line per problem (naming the tensor and expert).")
    v.add_argument("store", metavar="STORE", help="store directory (holds manifest.json)")
    v.set_defaults(fn=cmd_verify)
