"""Several processes (issue 22): two processes on this machine, each with 2 CPU devices (4 in all), joined by
jax.distributed (gloo collectives), run one expert-parallel engine; process 0 takes the requests and broadcasts them
each step, process 1 follows. Their tokens must equal a one-process run on 4 devices and the single-device engine.
Also `--devices` on the command line (generate, bench, plan) and its errors.

Process 0 is a library script that joins from the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID); process 1 is `dsjax generate --coordinator ... --num-processes 2 --process-id 1`, the follower's
command line. A third process (4 devices, one process) computes the oracles. All three run at once; each prints one
JSON line of findings and the assertions are here.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from dsjax.cli import main

PROMPTS = ["To be, or not to be", "The king", [5, 6, 7, 8, 9]]
LATE = ("Once upon a time there", 8, [9, 10, 11, 12], 4)      # prompt A and its tokens; B joins A's decode

LEADER = r"""
import json, os, sys
from dsjax.runtime.multihost import initialize
assert initialize()                           # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
import jax, dsjax
store, prompts, late = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
e = dsjax.load(store, devices=jax.device_count())
out = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
       "local": jax.local_device_count(), "kind": type(e).__name__}
out["batch"] = [g.token_ids for g in e.generate(prompts, max_new_tokens=6)]
a = e.submit(late[0], max_new_tokens=late[1])
events = a.events()
next(events), next(events)                    # A is decoding: B joins a running batch, C is cancelled at once
b = e.submit(late[2], max_new_tokens=late[3])
c = e.submit("The king", max_new_tokens=20)
c.cancel()
out["late"] = [a.result().token_ids, b.result().token_ids]
out["cancelled"] = c.result().finish_reason
try:
    e.logits([[1, 2, 3]])
except NotImplementedError as err:
    out["logits_error"] = str(err)
out["per_device"] = e.stats()["parallel"]["per_device"]
out["acts"] = e.stats()["expert_activations"]
e.close()
print(json.dumps(out), flush=True)
"""

ORACLE = r"""
import contextlib, faulthandler, io, json, sys
faulthandler.enable()                          # before main() would, while stderr is still the real one
import numpy as np, jax, dsjax
from dsjax.cli import main
from dsjax.runtime.bench import bench
store, prompts, late = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {"devices": jax.device_count()}
ref = dsjax.load(store, in_memory=True)          # the single-device engine
out["ref_batch"] = [g.token_ids for g in ref.generate(prompts, max_new_tokens=6)]
out["ref_late"] = [ref.generate(late[0], max_new_tokens=late[1]).token_ids,
                   ref.generate(late[2], max_new_tokens=late[3]).token_ids]
ep = dsjax.load(store, devices=4)                # one process, 4 devices
out["ep_batch"] = [g.token_ids for g in ep.generate(prompts, max_new_tokens=6)]
out["shards"] = {i: [s.tolist() for s in sh.experts] for i, sh in ep.shards.items()}
ep.close()

def cli(*argv):
    o, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, o.getvalue(), err.getvalue()

args = [a for p in prompts if isinstance(p, str) for a in ("--prompt", p)]
rc, o, err = cli("generate", store, "--devices", "4", "--json", "--max-new-tokens", "6", *args)
out["cli"] = {"rc": rc, "tokens": [json.loads(x)["token_ids"] for x in o.splitlines()], "err": err[-2000:]}
rc, o, err = cli("generate", store, "--devices", "4", "--gpu-memory", "1GB", "--json", "--max-new-tokens", "6",
                 "--stats", *args)
out["cli_budget"] = {"rc": rc, "err": err[-2000:], "tokens": [json.loads(x)["token_ids"] for x in o.splitlines()],
                     "devices": json.loads(err.strip().splitlines()[-1]).get("expert_devices") if rc == 0 else None}
rc, o, err = cli("generate", store, "--devices", "4", "--gpu-memory", "3GB", "--json", "--max-new-tokens", "6",
                 "--stats", *args)
out["cli_budget_fits"] = {"rc": rc, "tokens": [json.loads(x)["token_ids"] for x in o.splitlines()],
                          "kv_pages": json.loads(err.strip().splitlines()[-1])["requests"]["kv"]["pages"]}
r = bench(store, devices=4, configs=["hbm"], batches=[1], prompt_len=8, tokens=3, trace=False)
out["bench"] = r["rows"][0]["parallel"]
out["top_k"], out["moe_layers"] = ref.config.num_experts_per_tok, sum(map(ref.config.is_moe_layer,
                                                                           range(ref.config.num_hidden_layers)))
print(json.dumps(out), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), **extra)


@pytest.fixture(scope="module")
def runs(store):
    addr = f"127.0.0.1:{_free_port()}"
    data = [json.dumps(PROMPTS), json.dumps(LATE)]
    procs = {
        "leader": subprocess.Popen([sys.executable, "-c", LEADER, store, *data], text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=_env(2, JAX_COORDINATOR_ADDRESS=addr,
                                                                    JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0")),
        "follower": subprocess.Popen([sys.executable, "-m", "dsjax.cli", "generate", store, "--coordinator", addr,
                                      "--num-processes", "2", "--process-id", "1"], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(2)),
        "oracle": subprocess.Popen([sys.executable, "-c", ORACLE, store, *data], text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=_env(4)),
    }
    done = {}
    try:
        for name, p in procs.items():
            o, e = p.communicate(timeout=240)
            done[name] = (p.returncode, o, e)
    except subprocess.TimeoutExpired:
        for p in procs.values():
            p.kill()
        pytest.fail("a process of the run did not finish in 240 s: "
                    + "; ".join(f"{n}: {p.communicate()[1][-1500:]}" for n, p in procs.items()))
    for name, (rc, o, e) in done.items():
        assert rc == 0, f"{name} exited {rc}:\n{e[-4000:]}"
    return {n: (json.loads(o.strip().splitlines()[-1]) if n != "follower" else (o, e)) for n, (_, o, e) in
            done.items()}


def test_two_processes_give_the_tokens_of_one_process_and_of_one_device(runs):
    lead, oracle = runs["leader"], runs["oracle"]
    assert (lead["processes"], lead["devices"], lead["local"], lead["kind"]) == (2, 4, 2, "MultiHostEngine")
    assert oracle["ep_batch"] == oracle["ref_batch"], "one process on 4 devices differs from the single device"
    assert lead["batch"] == oracle["ref_batch"], "two processes differ from the single-device engine"


def test_requests_that_join_a_running_batch_and_cancellations_reach_the_follower(runs):
    """B enters while A decodes: the follower admits it at the same step, or the psums would pair different
    programs (a hang or an error, caught by the timeout) and the tokens differ."""
    lead, oracle = runs["leader"], runs["oracle"]
    assert lead["late"] == oracle["ref_late"]
    assert lead["cancelled"] == "cancelled"
    assert "not built" in lead["logits_error"]


def test_the_follower_prints_nothing_and_each_process_holds_its_devices_experts(runs):
    out, _ = runs["follower"]
    assert out == "", f"the follower printed {out!r}"          # gloo's connection messages go to stderr
    per = runs["leader"]["per_device"]
    assert [d["process"] for d in per] == [0, 0, 1, 1]
    shards = runs["oracle"]["shards"]                  # the split is the same in one process and in two
    acts = runs["leader"]["acts"]
    for d, dev in enumerate(per):
        assert dev["experts"] == sum(len(s[d]) for s in shards.values())
        assert dev["assignments"] == sum(acts[int(i)][e] for i, s in shards.items() for e in s[d])


def test_cli_devices_runs_expert_parallel_and_budgets_apply_per_device(runs):
    oracle = runs["oracle"]
    texts = [p for p in PROMPTS if isinstance(p, str)]
    ref = [t for p, t in zip(PROMPTS, oracle["ref_batch"]) if isinstance(p, str)]
    assert oracle["cli"]["rc"] == 0 and oracle["cli"]["tokens"] == ref, oracle["cli"]["err"]
    assert len(ref) == len(texts)
    # 1 GB per device cannot hold a device's share with the 2 GB activation reserve: the tiered runtime runs it
    # (tiered expert parallelism), here with every expert fitting the first device's budget, and says so
    b = oracle["cli_budget"]
    assert b["rc"] == 0 and b["tokens"] == ref, b["err"]
    assert b["devices"]["count"] == 1 and "fits the first device" in b["devices"]["note"], b["devices"]
    fits = oracle["cli_budget_fits"]
    assert fits["rc"] == 0 and fits["tokens"] == ref
    # 3 GB per device, less 2 GB reserve and ~8 MB of weights: the KV pool is sized to the budget, not the default
    assert 0 < fits["kv_pages"] < 512, fits["kv_pages"]


def test_bench_over_four_devices_reports_each_devices_share(runs):
    row, oracle = runs["oracle"]["bench"], runs["oracle"]
    per = row["per_device"]
    assert row["devices"] == 4 and len(per) == 4
    # the measured generation: 8 prompt tokens and 2 decode steps, each token routed to top_k experts per MoE layer
    assert row["total"]["assignments"] == (8 + 3 - 1) * oracle["top_k"] * oracle["moe_layers"]
    assert sum(d["assignments"] for d in per) == row["total"]["assignments"]
    assert abs(sum(d["assignment_share"] for d in per) - 1) < 1e-9
    assert [d["experts"] for d in per] == [4 * oracle["moe_layers"]] * 4


# ---- in this process (one CPU device): the command line's checks, before anything loads --------------------------

def test_too_many_devices_names_the_count_the_devices_and_the_fix(store, capsys):
    assert main(["generate", store, "--devices", "64", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--devices 64" in err and "JAX sees 1 device(s) (cpu:0)" in err
    assert "--xla_force_host_platform_device_count=64" in err
    assert main(["generate", store, "--devices", "0", "--prompt", "x"]) == 2


def test_tiered_options_with_devices_run_in_one_process(store):
    """A preset or a tiered runtime option with --devices is tiered expert parallelism, which runs in one process
    (tests/test_tiered_parallel.py checks its tokens); bench's cpu config stays on one device."""
    from dsjax.cli import _check_budgets_with_devices, build_parser
    args = build_parser().parse_args(["generate", store, "--preset", "balanced", "--set", "max_gpu_layers=2",
                                      "--set", "max_batch_size=4"])
    _check_budgets_with_devices(args, 2)           # one process: no error
    from dsjax.runtime.bench import bench
    with pytest.raises(ValueError, match="config cpu .CPU-computed experts. runs on one device"):
        bench(store, devices=2, configs=["budget", "cpu"])


def test_several_processes_need_the_coordinator_and_an_id(store, capsys):
    assert main(["generate", store, "--num-processes", "2", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "--coordinator (JAX_COORDINATOR_ADDRESS)" in err and "--process-id (JAX_PROCESS_ID)" in err
    assert main(["generate", store, "--num-processes", "2", "--coordinator", "127.0.0.1:1", "--process-id", "2",
                 "--prompt", "x"]) == 2
    assert "process id 2 must lie in [0, 2)" in capsys.readouterr().err


def test_plan_devices_prints_each_gpu_and_the_prediction_of_plan_devices(store, capsys):
    from dsjax.runtime.plan_devices import plan_devices
    from dsjax.runtime.planner import Links
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    assert main(["plan", store, "--devices", "2", "--gpu-memory", "16MB,20MB", "--host-memory", "1GB",
                 "--batch", "8"]) == 0
    out = capsys.readouterr().out
    st = Store(store)
    mb = model_bytes_from_store(st)
    cfg = st.config
    st.close()
    want = plan_devices(mb, 2, ["16MB", "20MB"], "1GB", links=Links(h2d=50e9, disk=12e9, hbm=3000e9), batch=8,
                        context_tokens=min(4096, cfg.max_position_embeddings), core="first")
    assert "GPU 0 (16.00 MB GPU" in out and "GPU 1 (20.00 MB GPU" in out
    assert f"predicted: {want.tokens_per_s:.2f} tok/s" in out and want.mode == "tiered"
    assert "layer cores on GPU 0 only" in out       # the tiered layout that runs (tiered.TieredEngine, devices=)
    assert main(["plan", store, "--devices", "0"]) == 2
