"""`dsjax bench`: the harness runs every configuration on a real store and its arithmetic is right."""

import gzip
import json
import os

import pytest

from dsjax.runtime.bench import bench, gpu_busy_fraction, markdown, trace_timeline


def test_busy_fraction_is_the_union_of_kernel_time(tmp_path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 1, "name": "fusion", "ts": 0, "dur": 100},
        {"ph": "X", "pid": 1, "tid": 2, "name": "gemm", "ts": 50, "dur": 100},      # overlaps: union 0..150
        {"ph": "X", "pid": 1, "tid": 3, "name": "MemcpyH2D", "ts": 300, "dur": 500},  # copies are not compute
        {"ph": "X", "pid": 1, "tid": 1, "name": "reduce", "ts": 400, "dur": 50},
        {"ph": "X", "pid": 2, "tid": 1, "name": "python", "ts": 0, "dur": 900},      # host events ignored
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert gpu_busy_fraction(str(tmp_path), wall_s=1e-3) == pytest.approx(200e-6 / 1e-3)
    assert gpu_busy_fraction(str(tmp_path / "none"), wall_s=1.0) is None


def test_trace_timeline_measures_copy_compute_overlap(tmp_path):
    gpu = {"pid": 1, "ph": "X"}
    h2d = lambda ts, dur, size: dict(gpu, tid=9, name="MemcpyH2D", ts=ts, dur=dur,  # noqa: E731
                                     args={"memcpy_details": f"kind_src:pinned kind_dst:device size:{size} async:1"})
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        dict(gpu, tid=1, name="fusion", ts=0, dur=4000),            # kernels: 0..4 ms and 6..10 ms
        dict(gpu, tid=1, name="gemm", ts=6000, dur=4000),
        h2d(3000, 2000, 2_000_000),                                  # 3..5 ms: 1 ms under a kernel
        h2d(7000, 1000, 1_000_000),                                  # 7..8 ms: all under a kernel
        dict(gpu, tid=1, name="MemcpyD2D", ts=4500, dur=100),        # not compute, not host->GPU
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    t = trace_timeline(str(tmp_path), bin_ms=5.0)
    assert t["span_s"] == pytest.approx(10e-3) and t["kernel_s"] == pytest.approx(8e-3)
    assert t["h2d_s"] == pytest.approx(3e-3) and t["h2d_overlapped_s"] == pytest.approx(2e-3)
    assert t["h2d_bytes"] == 3_000_000
    # bins of 5 ms: kernels 4 of 5 ms in each; copies 2 MB in the first bin, 1 MB in the second
    assert t["kernel_busy"] == pytest.approx([0.8, 0.8])
    assert t["h2d_GB_s"] == pytest.approx([2e6 / 5e-3 / 1e9, 1e6 / 5e-3 / 1e9])


def test_bench_on_a_store(demo_checkpoint, tmp_path):
    from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    from dsjax.store.writer import convert
    store = str(tmp_path / "s")
    convert(demo_checkpoint, store, progress=False)
    mb = model_bytes_from_store(Store(store))
    g = minimum_gpu_memory(mb, context_tokens=512, max_gpu_layers=1, prefetch_layers=1)
    kw = dict(gpu_memory=g, host_memory=minimum_host_memory(mb), prompt_len=8, tokens=4, dtype="float32",
              trace=False, max_gpu_layers=1, prefetch_layers=1, out=str(tmp_path / "b.json"))
    first = bench(store, batches=(1,), configs=("budget",), **kw)
    r = bench(store, batches=(1, 2), **kw)            # resumes: the budget/1 row is kept, the others measured
    assert r["rows"][0] == first["rows"][0] and r["ceilings"] == first["ceilings"]
    assert json.load(open(tmp_path / "b.json"))["rows"] == r["rows"]
    rows = {(x["config"], x["batch"]): x for x in r["rows"]}
    assert set(rows) == {(c, b) for c in ("budget", "resident", "on_demand") for b in (1, 2)}
    assert rows[("resident", 1)]["bytes_per_step"].get("host->GPU", 0) == 0
    budget = rows[("budget", 1)]
    assert budget["bytes_per_step"]["host->GPU"] > 0 and budget["roofline_ms"] > 0
    assert 0 <= budget["prefetch"]["used"] <= budget["prefetch"]["copies"]
    assert rows[("on_demand", 1)]["prefetch"] == {"copies": 0, "used": 0}
    assert budget["roofline_ms"] == pytest.approx(1e3 * max(
        budget["bytes_per_step"].get("host->GPU", 0) / r["ceilings"]["h2d"],
        budget["bytes_per_step"].get("disk->host", 0) / r["ceilings"]["disk"]))
    assert r["ceilings"]["h2d"] > 0 and r["ceilings"]["disk"] > 0
    table = markdown(r)
    assert table.count("\n| budget |") == 2 and "ceilings measured in this run" in table
    # each tiered row's prediction is the plan for this machine: the ceilings just measured, not the default box
    from dsjax.runtime.planner import Links, plan
    c = r["ceilings"]
    measured = Links(h2d=c["h2d"], disk=c["disk"], hbm=c["hbm"] or Links().hbm, measured=True)
    ctx = min(4096, Store(store).config.max_position_embeddings)
    planned = {ln: plan(mb, g, kw["host_memory"], max_gpu_layers=1, prefetch_layers=1, links=ln, overlap_io=False,
                        context_tokens=ctx).tokens_per_s for ln in (measured, Links())}
    assert planned[measured] != pytest.approx(planned[Links()])
    assert rows[("on_demand", 1)]["predicted_tok_s"] == pytest.approx(planned[measured])
    assert f"| {planned[measured]:.2f} |" in table
    assert rows[("on_demand", 2)]["predicted_tok_s"] is None          # the plan is for batch 1 only
    # host work: the engine thread's CPU time per step, at most the step's wall time, and the table's cell is it
    cpu = budget["host_cpu_ms_per_step"]
    n_moe = sum(Store(store).config.is_moe_layer(i) for i in range(Store(store).config.num_hidden_layers))
    assert 0 < cpu["step"] <= budget["step_ms"] and budget["moe_layers"] == n_moe
    assert f"| {cpu['step']:.1f} ({cpu['step'] / n_moe:.2f}) |" in table
    mem = budget["process_memory"]
    assert 0 < mem["rss"] <= mem["peak_rss"] and f"{mem['rss'] / 1e9:.1f} ({mem['peak_rss'] / 1e9:.1f})" in table
    # the GPU allocator's bytes: the CPU backend keeps none, so the row says nothing and the cell is "-"
    assert budget["gpu_memory"] == {"in_use": None, "peak": None, "limit": None}
    assert f"{mem['rss'] / 1e9:.1f} ({mem['peak_rss'] / 1e9:.1f}) | - |" in table
    # the all-in-HBM reference: the plain engine, no links, the same model
    h = bench(store, batches=(1,), configs=("hbm",), **dict(kw, out=None))["rows"][0]
    assert h["config"] == "hbm" and h["decode_tok_s"] > 0 and h["bytes_per_step"] == {}
    # profile only the configs named (a trace costs a few tokens under the profiler)
    bench(store, batches=(1,), configs=("budget", "resident"), trace_dir=str(tmp_path / "t"),
          **dict(kw, trace=("budget",), out=str(tmp_path / "c.json")))
    assert sorted(os.listdir(tmp_path / "t")) == ["budget_b1"]


def test_disk_ceiling_reads_every_file_whole_concurrently(tmp_path, monkeypatch):
    """read_rate = all the files' bytes / the wall time of reading them with DISK_READERS threads."""
    import threading
    import time
    import types

    from dsjax.runtime import bench as bench_mod
    sizes = [0, 1, 5 << 20, (16 << 20) + 3, 123457] + [4096] * 12
    files = []
    for k, n in enumerate(sizes):
        f = tmp_path / f"shard{k}"
        f.write_bytes(os.urandom(n))
        files.append(str(f))
    threads = set()
    real_open = open

    def spy_open(*a, **kw):
        threads.add(threading.get_ident())
        time.sleep(0.02)                      # slow enough that the pool starts more than one reader
        return real_open(*a, **kw)

    clock = iter([10.0, 12.0])
    monkeypatch.setattr(bench_mod, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    monkeypatch.setattr("builtins.open", spy_open)
    assert bench_mod.read_rate(files) == sum(sizes) / 2.0
    assert 1 < len(threads) <= bench_mod.DISK_READERS


def test_copy_paths_script_writes_the_same_bytes_by_every_path(tmp_path):
    """bench/copy_paths.py (issue 20, item 1: where the engine thread's time goes per expert copy) on the CPU backend:
    the copy inside the slot write (path B) and the puts from worker threads (path G) must write the bytes today's
    list put + slot write (path A) writes, and all the experts' own bytes (the script exits non-zero otherwise); every
    path is timed for every count, and the copying paths report n x the layout's bytes."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "copy_paths.json"
    r = subprocess.run([sys.executable, str(root / "bench" / "copy_paths.py"), "--experts", "1,3", "--reps", "2",
                        "--hidden", "256", "--inter", "128", "--slots", "4", "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    B = d["expert_bytes"]
    # NVFP4 expert of hidden 256, intermediate 128: each of gate, up, down holds 128 x 256 values (packed two per byte,
    # one scale per 16) and a float32 global scale, every part starting on a 256-byte boundary
    packed = 128 * 256 // 2
    scales = 128 * 256 // 16
    assert B == 3 * (packed + scales + 256)
    rows = {(x["path"][0], x["experts"]): x for x in d["rows"]}
    assert set(rows) == {(p, n) for p in "ABCDEFG" for n in (1, 3)}
    for (p, n), x in rows.items():
        assert x["bytes"] == (n * B if p in "ABCDG" else 0)
        assert x["total_ms"] > 0 and x["issue_cpu_ms"] >= 0


def test_bench_refuses_no_warmup_before_measuring_or_writing(tmp_path):
    """--warmup-tokens 0 (or --tokens 0) is refused before the ceilings are measured or --out is written."""
    out = tmp_path / "b.json"
    for kw in (dict(warmup_tokens=0), dict(tokens=0)):
        with pytest.raises(ValueError, match="--tokens >= 1 and --warmup-tokens >= 1"):
            bench(str(tmp_path / "no-store"), out=str(out), **kw)
    assert not out.exists()


def _bench_script(name: str):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_occupancy_reference_decodes_each_request_from_its_arrival_one_token_a_step():
    ref = _bench_script("arrivals").occupancy_reference
    step = lambda n: 0.1 * n                                      # noqa: E731
    # A (2 tokens) at 0 decodes alone for 0.1 s; B (1 token, arrived at 0.05) joins the next step, 2 rows: 0.2 s
    assert ref([(0.0, [], 2), (0.05, [], 1)], step) == (3, pytest.approx(0.3))
    # C arrives after both ended: idle until 1.0, then one step alone; order of the trace does not matter
    assert ref([(1.0, [], 1), (0.05, [], 1), (0.0, [], 2)], step) == (4, pytest.approx(1.1))
    # all at once: the batch shrinks as the short ones end (3 rows, then 2, then 1)
    assert ref([(0.0, [], 1), (0.0, [], 2), (0.0, [], 3)], step) == (6, pytest.approx(0.3 + 0.2 + 0.1))
