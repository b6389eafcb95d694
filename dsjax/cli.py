"""The `dsjax` command line: thin argparse front-ends over the library (all logic lives in dsjax.*)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

UNLIMITED_BYTES = 1 << 56       # pool capacities at or above this are the runtime's "no budget" sentinel


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def add_device_args(p: argparse.ArgumentParser, hosts: bool = True) -> None:
    """--devices (expert parallelism) and, with `hosts`, the flags of a run over several processes (hosts)."""
    p.add_argument("--devices", type=int, default=None, help="split each MoE layer's routed experts over N devices "
                   "(expert parallelism; default 1). --gpu-memory and --host-memory then apply to each device: every "
                   "weight resident when each device's share fits, else tiered (each device streams its own experts "
                   "into its own slots over its own link; one process)")
    if not hosts:
        return
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="several processes (hosts): address of "
                   "process 0's coordinator, the same on every process (default: $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, default=None, help="several processes: how many (default: "
                   "$JAX_NUM_PROCESSES, else 1); --devices then defaults to every device of every process")
    p.add_argument("--process-id", type=int, default=None, help="several processes: this one's id, 0..N-1 (default: "
                   "$JAX_PROCESS_ID); process 0 takes the prompts or requests, the others follow its steps")


def start_devices(args: argparse.Namespace) -> int | None:
    """Join a run of several processes when the flags or environment ask for one, and check --devices against the
    devices JAX sees: the `devices` argument for dsjax.load (None: one device, the plain runtime)."""
    several = False
    if hasattr(args, "coordinator"):
        from dsjax.runtime.multihost import initialize
        several = initialize(args.coordinator, args.num_processes, args.process_id)
    if several:
        # gloo prints its connection messages on the process's stdout (fd 1), amid the generated text: native
        # writes go to stderr from here, Python's prints to the real stdout
        sys.stdout.flush()
        real = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(real, "w", buffering=1)
    n = args.devices
    if n is not None and n < 1:
        raise ValueError(f"--devices {n}: give a number of devices >= 1")
    if not several and (n is None or n == 1):
        return None
    import jax
    have = jax.devices()
    if several:
        if n is not None and n != len(have):
            raise ValueError(f"--devices {n}: a run of {jax.process_count()} processes uses every device of every "
                             f"process ({len(have)}); leave --devices out or give {len(have)}")
        return len(have)
    if n > len(have):
        from dsjax.runtime.parallel import device_count_fix
        names = ", ".join(str(d) for d in have[:8]) + (", ..." if len(have) > 8 else "")
        raise ValueError(f"--devices {n}: JAX sees {len(have)} device(s) ({names}); {device_count_fix(n, have)}")
    return n


def _check_budgets_with_devices(args: argparse.Namespace, devices: int | None) -> None:
    """Over several processes every weight is resident: a preset or a tiered option there is the not-built tiered
    expert parallelism across processes (in one process it runs: dsjax.load's devices=)."""
    import jax
    if devices is None or jax.process_count() == 1:
        return
    from dsjax.runtime.parallel import ENGINE_OPTIONS
    tiered = (["--preset"] if args.preset else []) + [f"--set {k}" for k in parse_overrides(args.set)
                                                      if k not in ENGINE_OPTIONS]
    if tiered:
        raise NotImplementedError(f"--devices {devices} over {jax.process_count()} processes with {', '.join(tiered)}:"
                                  " tiered expert parallelism runs in one process and is not built over several; "
                                  f"drop {', '.join(tiered)} to run every weight resident with the experts split "
                                  "over the devices, or run in one process")


def _print_stats(stats: dict, file=None) -> None:
    stats = stats.get("generation", stats)
    print(f"[dsjax] prompt tokens {stats.get('prompt_tokens')}, generated {stats.get('generated_tokens')}, "
          f"time to first token {stats.get('ttft_s', 0) * 1e3:.1f} ms, decode {stats.get('decode_tok_s', 0):.1f} tok/s",
          file=file or sys.stderr)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values; `--prompt -`, or no --prompt with text piped in, reads one prompt from stdin."""
    prompts = list(args.prompt or [])
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("generate: no prompt; give --prompt TEXT (repeatable), or pipe the prompt on stdin "
                             "(--prompt - reads it from stdin)")
        prompts = ["-"]
    if "-" in prompts:
        text = sys.stdin.read().rstrip("\n")
        if not text:
            raise ValueError("generate: the prompt read from stdin is empty; pipe some text, or give --prompt TEXT")
        prompts = [text if p == "-" else p for p in prompts]
    return prompts


def _readable_stats(stats: dict) -> dict:
    """The runtime's figures for printing: a pool without a budget reports capacity "unlimited" (the runtime keeps
    a huge sentinel number internally; Prometheus text omits the gauge)."""
    pools = stats.get("pools")
    if not isinstance(pools, dict):
        return stats
    return dict(stats, pools={k: dict(v, capacity="unlimited") if isinstance(v, dict) and isinstance(
        v.get("capacity"), int) and v["capacity"] >= UNLIMITED_BYTES else v for k, v in pools.items()})


def cmd_generate(args: argparse.Namespace) -> int:
    import contextlib
    import dsjax
    devices = start_devices(args)
    follower = _follower()
    if not follower:
        args.prompt = _read_prompts(args)
    if args.json:
        args.no_stream = True       # JSON describes whole generations: --json prints them, not a stream
    _check_budgets_with_devices(args, devices)
    if not follower:                # sampling options are checked before the load, not after it and the prompt's echo
        from dsjax.runtime.sampling import SamplingParams
        SamplingParams(**_sampling(args))
    runtime = {k: v for k, v in (("preset", args.preset), ("gpu_memory", args.gpu_memory),
                                 ("host_memory", args.host_memory), ("devices", devices)) if v is not None}
    runtime.update(parse_overrides(args.set))
    engine = dsjax.load(args.path, dtype=args.dtype, progress=True, **runtime)
    if follower:                    # another process of the run: process 0 has the prompts and prints
        engine.follow()
        return 0
    trace = contextlib.nullcontext()
    if args.trace:
        import jax
        trace = jax.profiler.trace(args.trace)
    try:
        with trace:
            rc = _generate(engine, args)
        if args.save_popularity:
            engine.save_popularity(args.save_popularity)
            print(f"[dsjax] expert activations of this run written to {args.save_popularity} (load with "
                  f"--set hot_experts=N --set popularity={args.save_popularity})", file=sys.stderr)
        if args.stats and hasattr(engine, "stats_prometheus"):
            from dsjax.runtime.metrics import json_line, prometheus_text
            stats = _readable_stats(engine.stats())
            print(prometheus_text(stats) if args.stats_format == "prometheus" else json_line(stats), file=sys.stderr)
    finally:
        if devices is not None:
            engine.close()          # several processes: the others return from follow()
    return rc


def _follower() -> bool:
    """A process other than 0 of a run over several processes (after start_devices)."""
    import jax
    return jax.process_count() > 1 and jax.process_index() != 0


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                stop=tuple(args.stop), seed=args.seed)


def _generate(engine, args: argparse.Namespace) -> int:
    prompts = args.prompt
    kw = _sampling(args)
    if args.no_stream:
        for g in engine.generate(prompts, chat=args.chat, **kw):
            print(json.dumps({"prompt_ids": g.prompt_ids, "token_ids": g.token_ids, "text": g.text,
                              "finish_reason": g.finish_reason}) if args.json else g.text)
    else:
        for i, p in enumerate(prompts):
            print(p, end="", flush=True)
            for ev in engine.stream(p, chat=args.chat, **kw):
                print(ev.text, end="", flush=True)
            print()
            if args.stats:
                _print_stats(engine.stats())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded model -> FP4 store -> generation under budgets that make all three tiers work."""
    from dsjax.demo import run_demo
    return run_demo(args.dir, dtype=args.dtype, max_new_tokens=args.max_new_tokens)


def _directory(path: str, what: str) -> str:
    """`path` if it is a directory, else a ValueError that says what it is instead."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory; give {what}")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not a directory; give {what}")
    return path


def _unfinished_store(path: str) -> None:
    from dsjax.store.manifest import MANIFEST_FILE, StoreError, looks_like_store, unfinished_store_message
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST_FILE)) and looks_like_store(path):
        raise StoreError(unfinished_store_message(path))


def cmd_info(args: argparse.Namespace) -> int:
    from dsjax.config import ModelConfig
    path = _directory(args.path, "a Hugging Face checkpoint directory or a dsjax store")
    _unfinished_store(path)
    if os.path.exists(os.path.join(path, "manifest.json")):
        from dsjax.store.manifest import read_manifest
        m = read_manifest(path)
        cfg = ModelConfig.from_dict(m.model_config, source=os.path.join(path, "manifest.json"))
    else:
        from dsjax.store.safetensors_io import Checkpoint
        cfg, m = ModelConfig.from_json(path), None
    kinds = cfg.layer_kinds
    print(f"model_type {cfg.model_type}: {cfg.num_hidden_layers} layers ({kinds.count('dense')} dense, "
          f"{kinds.count('moe')} MoE), hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    if cfg.has_moe:
        print(f"experts: {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.topk_method}/"
              f"{cfg.scoring_func}, groups {cfg.n_group}/{cfg.topk_group}) + {cfg.n_shared_experts or 0} shared")
    if m is not None:
        t = m.totals()
        fp4 = sum(1 for r in m.tensors.values() if r.is_fp4)
        print(f"dsjax store: {m.fmt} (policy {m.policy}), {len(m.tensors)} tensors ({fp4} in {m.fmt}), "
              f"{t['bytes'] / 1e9:.3f} GB (core {t['core_bytes'] / 1e9:.3f} GB, routed experts "
              f"{t['expert_bytes'] / 1e9:.3f} GB), converted from {m.source.get('name')!r} by dsjax "
              f"{m.dsjax_version}")
        return 0
    ck = Checkpoint(path)
    print(f"checkpoint: {len(ck.files)} file(s), {len(ck.names())} tensors, {ck.total_bytes / 1e9:.3f} GB")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dsjax.config import ModelConfig
    from dsjax.runtime.planner import GB, Links, ModelBytes, plan
    if not os.path.exists(args.path):
        raise FileNotFoundError(f"{args.path}: no such file or directory; give a checkpoint or store directory, "
                                "or a config.json")
    _unfinished_store(args.path)
    if os.path.exists(os.path.join(args.path, "manifest.json")):      # a store: its real byte counts
        from dsjax.runtime.tiered import model_bytes_from_store
        from dsjax.store.reader import Store
        store = Store(args.path)
        cfg, mb = store.config, model_bytes_from_store(store)
    else:
        cfg = ModelConfig.from_json(args.path)
        mb = ModelBytes.from_config(cfg, args.format, args.policy)
    from dsjax.runtime.config import active_experts_config
    mb = mb.with_top_k(active_experts_config(cfg, args.active_experts).num_experts_per_tok or 0)
    links = Links(h2d=args.h2d_gbps * GB, disk=args.disk_gbps * GB, hbm=args.hbm_gbps * GB,
                  cpu_rate=args.cpu_gbps * GB)
    context = _plan_context(args.context, cfg.max_position_embeddings)
    if args.devices < 1:
        raise ValueError(f"--devices {args.devices}: give a number of GPUs >= 1")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: give a decode batch >= 1")
    if args.devices > 1 or args.batch > 1:          # per device, N host links, one shared disk (plan_devices.py)
        from dsjax.runtime.plan_devices import plan_devices
        def budgets(v):
            return v.split(",") if "," in v else v
        kw = dict(links=links, batch=args.batch, context_tokens=context,
                  max_gpu_layers=args.max_gpu_layers, prefetch_layers=args.prefetch_layers,
                  overlap_io=not args.no_overlap)
        # the layout that runs: every weight resident (layers replicated) when each GPU's share fits, else tiered
        # with the layers on the first GPU and the other GPUs holding experts only
        pd = plan_devices(mb, args.devices, budgets(args.gpu_memory), budgets(args.host_memory), core="first", **kw)
        print(pd.report(mb, links))
        return 0
    kw = dict(max_gpu_layers=args.max_gpu_layers, prefetch_layers=args.prefetch_layers, links=links,
              overlap_io=not args.no_overlap, context_tokens=context)
    p = plan(mb, args.gpu_memory, args.host_memory, **kw)
    print(p.report(mb, links))
    from dsjax.runtime.planner import active_experts_options, measured_active_experts_quality
    quality = measured_active_experts_quality()
    options = active_experts_options(mb, args.gpu_memory, args.host_memory, quality, selected=args.active_experts,
                                     **kw)
    if options:
        print(options_table(options, quality, mb.model_top_k or mb.top_k, args.active_experts))
    return 0


def _plan_context(asked: int | None, model_max: int) -> int:
    """The KV context `dsjax plan` plans for: --context (default 4096) up to the model's max_position_embeddings; a
    --context given past it is planned at the model's length, with a note (the engine never holds more)."""
    if asked is None:
        return min(4096, model_max)
    if asked < 1:
        raise ValueError(f"--context {asked}: give a number of KV tokens >= 1")
    if asked > model_max:
        print(f"[dsjax plan] --context {asked} is past the model's max_position_embeddings ({model_max}); planning "
              f"for {model_max}", file=sys.stderr)
    return min(asked, model_max)


def options_table(options, quality: dict, top_k: int, selected: int) -> str:
    """`dsjax plan`'s options: each k of active experts with the plan's tok/s and bytes, and the quality cost that
    k / top-k measured on the embedded toy model (planner.measured_active_experts_quality)."""
    from dsjax.runtime.planner import fmt_bytes
    Q = quality["top_k"]
    lines = [f"options: route each token to its top k of the model's {top_k} experts, renormalised "
             "(--active-experts k, memory_config.active_experts); same budgets and links"
             + (f"; * = --active-experts {selected}" if selected else ""),
             f"  quality cost: measured on the embedded toy model ({quality['model']}: {quality['n_experts']} "
             f"experts, top-{Q}) at the same k / top-k; for any other model an order of magnitude, not a forecast "
             f"({quality['measured']['results']})",
             f"  {'k':>4}  {'tok/s':>7}  {'host->GPU/token':>15}  {'disk->host/token':>16}  {'bound':<11}  "
             "perplexity  top-1 agreement  KL (nats)"]
    for o in options:
        mark = "*" if o.selected else " "
        p, q = o.placement, o.quality
        speed = (f"{p.tokens_per_s:>7.2f}  {fmt_bytes(p.h2d_bytes_per_token):>15}  "
                 f"{fmt_bytes(p.disk_bytes_per_token):>16}  {p.bound if p.overlap_io else 'sum':<11}" if p else
                 f"{'does not fit these budgets':<55}")
        cost = (f"{100 * q['perplexity_increase']:>+9.1f}%  {q['top1_agreement']:>15.3f}  {q['kl_nats']:>9.3f}  "
                f"(k={q['k']} of {Q})" if q else "not measured at this k / top-k")
        lines.append(f"{mark} {o.k:>4}  {speed}  {cost}")
    return "\n".join(lines)


def parse_overrides(items: list[str]) -> dict:
    import yaml
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write KEY=VALUE, e.g. --set max_gpu_layers=2")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    from dsjax.runtime.bench import bench, markdown
    devices = start_devices(args)
    configs = args.configs or ("hbm" if devices else "budget,resident,on_demand")
    result = bench(args.path, gpu_memory=args.gpu_memory, host_memory=args.host_memory, preset=args.preset,
                   batches=[int(b) for b in args.batches.split(",")], prompt_len=args.prompt_len,
                   tokens=args.tokens, dtype=args.dtype, configs=configs.split(","), cold=args.cold, devices=devices,
                   warmup_tokens=args.warmup_tokens,
                   trace=False if args.no_trace else tuple(args.trace_configs.split(",")) if args.trace_configs
                   else True, out=args.out, trace_dir=args.trace_dir, **parse_overrides(args.set))
    table = markdown(result)
    print(table)
    if args.out:
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(f"`dsjax bench {' '.join(sys.argv[2:])}`\n\n{table}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsjax", description="DeepSeek MoE inference in JAX with FP4 weight tiering")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a dsjax store or a checkpoint directory",
                       description="Generate text from a dsjax store (made by `dsjax convert`; runs on the tiered "
                                   "runtime under memory budgets) or a Hugging Face checkpoint directory (loaded "
                                   "whole onto the device).")
    g.add_argument("path", help="dsjax store directory (manifest.json), or Hugging Face checkpoint directory "
                                "(config.json, *.safetensors, tokenizer.json)")
    g.add_argument("--prompt", action="append", help="prompt text (repeatable); '-' reads it from stdin, as does "
                                                     "giving no --prompt with text piped in")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    g.add_argument("--no-stream", action="store_true", help="print whole generations instead of streaming")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object per whole generation (implies --no-stream)")
    g.add_argument("--stats", action="store_true", help="print timing statistics after each generation and, for "
                   "a store, the runtime's figures (memory per pool, bytes and GB/s per link, hit rates, prediction)")
    g.add_argument("--stats-format", default="json", choices=["json", "prometheus"], help="runtime figures as one "
                   "JSON line (default) or Prometheus text")
    g.add_argument("--trace", default=None, help="write a jax.profiler trace (Perfetto/XProf) of the run to DIR "
                   "(on a GPU the profiler has ended runs with CUDA_ERROR_LAUNCH_FAILED: jax-ml/jax#40260)")
    g.add_argument("--preset", default=None, help="runtime preset for a store: low_latency, high_throughput, "
                   "balanced, or a YAML file")
    g.add_argument("--gpu-memory", default=None, help="GPU budget for a store, e.g. 16GB (default: the preset's, "
                   "or no limit)")
    g.add_argument("--host-memory", default=None, help="pinned host budget for a store, e.g. 96GB")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any memory_config / compute_config key for a store, e.g. --set max_gpu_layers=2 (repeatable)")
    g.add_argument("--save-popularity", default=None, metavar="PATH",
                   help="after generating, write the expert activations counted since load to PATH (JSON): the "
                   "popularity that --set hot_experts=N --set popularity=PATH keeps the most used experts on the GPU by")
    add_device_args(g)
    _add_sampling(g)
    g.set_defaults(fn=cmd_generate)

    d = sub.add_parser("demo", help="run the embedded tiny model end to end (no downloads)")
    d.add_argument("--dir", default=None, help="where to write the demo's NVFP4 store (default ~/.cache/dsjax/...)")
    d.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"], help="compute dtype")
    d.add_argument("--max-new-tokens", type=int, default=48, help="tokens per prompt (default 48)")
    d.set_defaults(fn=cmd_demo)

    pl = sub.add_parser("plan", help="what fits where under memory budgets, and the predicted decode speed",
                        description="Plan where a model's weights go under GPU and host budgets (resident layers, "
                                    "layer slots, GPU expert slots, host expert cache) and predict decode tokens/s "
                                    "from the link speeds, before anything is loaded. PATH: a dsjax store (its real "
                                    "byte counts), or a checkpoint directory or config.json (bytes estimated for "
                                    "--format and --policy).")
    pl.add_argument("path", help="checkpoint or store directory, or a config.json")
    pl.add_argument("--gpu-memory", default="16GB", help="GPU budget, bytes or e.g. 16GB / 16GiB (default 16GB)")
    pl.add_argument("--host-memory", default="96GB", help="pinned host budget (default 96GB)")
    pl.add_argument("--format", default="nvfp4", choices=["nvfp4", "mxfp4"],
                    help="FP4 format to plan for (a store's own format is used when PATH is a store)")
    pl.add_argument("--policy", default="mlp", choices=["experts", "mlp", "all", "all+lm_head"],
                    help="which tensors are FP4 (default mlp)")
    pl.add_argument("--max-gpu-layers", type=int, default=3, help="GPU layer slots for streamed layers")
    pl.add_argument("--prefetch-layers", type=int, default=2, help="layers of experts in flight ahead")
    pl.add_argument("--context", type=int, help="KV cache tokens the compute pool must hold (default 4096, or the "
                    "model's max_position_embeddings where that is less)")
    pl.add_argument("--h2d-gbps", type=float, default=50.0, help="pinned host->GPU GB/s (default 50, PCIe 5)")
    pl.add_argument("--disk-gbps", type=float, default=12.0, help="NVMe read GB/s (default 12)")
    pl.add_argument("--hbm-gbps", type=float, default=3000.0, help="GPU memory GB/s (default 3000)")
    pl.add_argument("--no-overlap", action="store_true", help="predict load-on-demand (links not overlapped)")
    pl.add_argument("--cpu-gbps", type=float, default=0.0, help="GB/s of the CPU expert kernel at batch 1 "
                    "(compute_config.cpu_experts: host-resident experts that miss the GPU computed on the CPU beside "
                    "the copies; bench/cpu_experts_bench.py measures it); default 0 = that path off")
    pl.add_argument("--active-experts", type=int, default=0, help="route each token to its top k experts "
                    "(memory_config.active_experts; 1..num_experts_per_tok, default 0 = the model's)")
    pl.add_argument("--devices", type=int, default=1, help="GPUs of one host (default 1): each owns 1/N of every "
                    "MoE layer's experts, its own host link and a copy of the rest; the disk is shared. Budgets are "
                    "per GPU (one value for all, or a comma-separated list). Prints each GPU's placement")
    pl.add_argument("--batch", type=int, default=1, help="decode rows per step to predict for (default 1)")
    pl.set_defaults(fn=cmd_plan)

    b = sub.add_parser("bench", help="measure a store under budgets against the machine's measured ceilings")
    b.add_argument("path", help="dsjax store directory")
    b.add_argument("--gpu-memory", default=None, help="GPU budget of the 'budget' and 'on_demand' configs")
    b.add_argument("--host-memory", default=None, help="pinned host budget of those configs")
    b.add_argument("--preset", default=None, help="runtime preset (low_latency, high_throughput, balanced)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="runtime option (repeatable)")
    b.add_argument("--batches", default="1,8,32", help="decode batch sizes (default 1,8,32)")
    b.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence (default 64)")
    b.add_argument("--tokens", type=int, default=16, help="tokens generated per sequence (default 16)")
    b.add_argument("--warmup-tokens", type=int, default=2, help="tokens of the unmeasured generation before each "
                   "row (default 2: it compiles the shapes; more lets the adaptive trials (copies ahead, the CPU "
                   "path) reach their verdicts first)")
    b.add_argument("--configs", default=None,
                   help="which of budget (the given budgets), resident (no limit), on_demand (overlap_io off), hbm "
                        "(the whole store on the GPU as a plain in-memory model: the all-in-HBM reference; with "
                        "--devices N, every weight resident with the experts split over the N devices), cpu (the "
                        "given budgets with cpu_experts on: host-resident experts computed on the CPU beside the "
                        "copies; budget and on_demand run with it off unless --set cpu_experts=... is given), cpu_auto "
                        "(the same with cpu_experts auto: the plan, then a trial of timed steps, decide). "
                        "Default budget,resident,on_demand; hbm with --devices N > 1 (budget and on_demand then run "
                        "tiered expert parallelism, resident runs on one device, cpu is one-device only)")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    b.add_argument("--cold", action="store_true", help="drop the page cache before the disk ceiling (root)")
    b.add_argument("--no-trace", action="store_true", help="skip the profiler trace (GPU busy fraction; on a GPU the "
                   "profiler has ended runs with CUDA_ERROR_LAUNCH_FAILED, jax-ml/jax#40260: each row is saved first)")
    b.add_argument("--trace-configs", default=None, help="profile only these configs (comma separated; a trace of a "
                   "row costs a few tokens' generation under the profiler)")
    b.add_argument("--out", default=None, help="write the results as JSON, row by row (and a .md table beside it); "
                   "rerunning with the same --out resumes, measuring only the rows not there yet")
    b.add_argument("--trace-dir", default=None, help="keep each row's jax.profiler trace under DIR/<config>_b<batch>")
    add_device_args(b, hosts=False)
    b.set_defaults(fn=cmd_bench)

    i = sub.add_parser("info", help="summarize a checkpoint's or a store's model and tensors",
                       description="Print the model (layers, experts, routing) of a Hugging Face checkpoint "
                                   "directory or a dsjax store, and its tensors: file count and size for a checkpoint, "
                                   "FP4 format, policy and bytes for a store.")
    i.add_argument("path", help="Hugging Face checkpoint directory or dsjax store directory")
    i.set_defaults(fn=cmd_info)

    from dsjax.store import cli_commands
    cli_commands.add_parsers(sub)
    from dsjax.serve import cli as serve_cli     # imports neither FastAPI nor uvicorn until `dsjax serve` runs
    serve_cli.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not faulthandler.is_enabled():       # a crash in native code (XLA, TensorStore) prints the Python stacks
        faulthandler.enable()
    from dsjax.config import ConfigError
    from dsjax.runtime.engine import PromptError
    from dsjax.runtime.tokenizer import TokenizerError
    from dsjax.runtime.planner import BudgetError
    from dsjax.store.safetensors_io import CheckpointError
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, PromptError, TokenizerError, BudgetError, FileNotFoundError,
            ValueError) as e:
        print(f"dsjax: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:        # a combination that is planned but not built: say so, no traceback
        print(f"dsjax: error: not built: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
