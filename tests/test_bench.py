"""`dsjax bench`: the harness runs every configuration on a real store and its arithmetic is right."""

import gzip
import json

import pytest

from dsjax.runtime.bench import bench, gpu_busy_fraction, markdown


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


def test_bench_on_a_store(demo_checkpoint, tmp_path):
    from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    from dsjax.store.writer import convert
    store = str(tmp_path / "s")
    convert(demo_checkpoint, store, progress=False)
    mb = model_bytes_from_store(Store(store))
    g = minimum_gpu_memory(mb, context_tokens=512, max_gpu_layers=1, prefetch_layers=1)
    r = bench(store, gpu_memory=g, host_memory=minimum_host_memory(mb), batches=(1, 2), prompt_len=8, tokens=4,
              dtype="float32", trace=False, max_gpu_layers=1, prefetch_layers=1)
    rows = {(x["config"], x["batch"]): x for x in r["rows"]}
    assert set(rows) == {(c, b) for c in ("budget", "resident", "on_demand") for b in (1, 2)}
    assert rows[("resident", 1)]["bytes_per_step"].get("host->GPU", 0) == 0
    budget = rows[("budget", 1)]
    assert budget["bytes_per_step"]["host->GPU"] > 0 and budget["roofline_ms"] > 0
    assert budget["roofline_ms"] == pytest.approx(1e3 * max(
        budget["bytes_per_step"].get("host->GPU", 0) / r["ceilings"]["h2d"],
        budget["bytes_per_step"].get("disk->host", 0) / r["ceilings"]["disk"]))
    assert r["ceilings"]["h2d"] > 0 and r["ceilings"]["disk"] > 0
    table = markdown(r)
    assert table.count("\n| budget |") == 2 and "ceilings measured in this run" in table
