"""The `dsjax` command line, called through dsjax.cli.main."""

import json

from dsjax.cli import main


def test_generate_json_matches_api(demo_checkpoint, demo_engine, capsys):
    rc = main(["generate", demo_checkpoint, "--prompt", "Shall I", "--prompt", "Thou art", "--max-new-tokens", "5",
               "--no-stream", "--json", "--dtype", "float32"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    api = demo_engine.generate(["Shall I", "Thou art"], max_new_tokens=5)
    assert [x["token_ids"] for x in lines] == [g.token_ids for g in api]
    assert [x["text"] for x in lines] == [g.text for g in api]


def test_generate_streams_prompt_and_text(demo_checkpoint, demo_engine, capsys):
    rc = main(["generate", demo_checkpoint, "--prompt", "Rough winds", "--max-new-tokens", "6", "--dtype", "float32",
               "--temperature", "0.8", "--seed", "2", "--stats"])
    out, err = capsys.readouterr()
    assert rc == 0
    g = demo_engine.generate("Rough winds", max_new_tokens=6, temperature=0.8, seed=2)
    assert out == "Rough winds" + g.text + "\n"
    assert "decode" in err and "tok/s" in err


def test_info(demo_checkpoint, capsys):
    assert main(["info", demo_checkpoint]) == 0
    out = capsys.readouterr().out
    assert "4 layers (1 dense, 3 MoE)" in out and "16 routed" in out


def test_errors_exit_2_with_message(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "model_type 'llama' is not supported" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    # sampling options are checked before the model loads (this one would fail to) and before the prompt is echoed
    for opt, msg in ((["--max-new-tokens", "0"], "max_new_tokens=0 must be >= 1"),
                     (["--top-p", "1.5"], "top_p=1.5 must lie in (0, 1]"), (["--stop", ""], "an empty stop string")):
        assert main(["generate", str(tmp_path), "--prompt", "x", *opt]) == 2
        out, err = capsys.readouterr()
        assert msg in err and out == "", (opt, out, err)


def test_plan_v3_from_config(tmp_path, capsys):
    from test_config import MODELS
    (tmp_path / "config.json").write_text(json.dumps(MODELS["v3"]))
    assert main(["plan", str(tmp_path), "--gpu-memory", "16GB", "--host-memory", "96GB"]) == 0
    out = capsys.readouterr().out
    assert "58 MoE x 256 experts of 24.77 MB" in out and "predicted:" in out and "bound by disk->host" in out
    assert main(["plan", str(tmp_path / "config.json"), "--gpu-memory", "2GB"]) == 2
    assert "too small" in capsys.readouterr().err
    # --context: planned up to the model's length, with a note past it; the KV line follows it
    MAX = MODELS["v3"]["max_position_embeddings"]
    assert main(["plan", str(tmp_path), "--gpu-memory", "16GB", "--host-memory", "96GB", "--context", "2048"]) == 0
    at_2048 = capsys.readouterr()
    assert "requests of 2048 tokens at once" in at_2048.out and "past the model's" not in at_2048.err
    assert main(["plan", str(tmp_path), "--gpu-memory", "200GB", "--host-memory", "96GB", "--context", str(4 * MAX)]) == 0
    past = capsys.readouterr()
    assert f"--context {4 * MAX} is past the model's max_position_embeddings ({MAX}); planning for {MAX}" in past.err
    assert f"requests of {MAX} tokens at once" in past.out
    assert main(["plan", str(tmp_path), "--context", "0"]) == 2
    assert "--context 0: give a number of KV tokens >= 1" in capsys.readouterr().err


def test_plan_prints_active_experts_options(tmp_path, capsys):
    """After the prediction (its lines as Placement.report prints them), one row per k = 8, 6, 4, 2: the planner's tok/s
    and bytes for that k, beside the quality the packaged table measured at the same k / top-k; --active-experts
    marks its row."""
    import os
    import re
    import dsjax
    from dsjax.config import ModelConfig
    from dsjax.runtime.planner import Links, ModelBytes, plan
    from test_config import MODELS
    (tmp_path / "config.json").write_text(json.dumps(MODELS["v3"]))
    with open(os.path.join(os.path.dirname(dsjax.__file__), "data", "active_experts_quality.json")) as f:
        quality = json.load(f)
    for selected in (0, 6):
        args = ["plan", str(tmp_path), "--gpu-memory", "16GB", "--host-memory", "96GB"]
        assert main(args + (["--active-experts", str(selected)] if selected else [])) == 0
        out = capsys.readouterr().out
        mb = ModelBytes.from_config(ModelConfig.from_dict(dict(MODELS["v3"], num_experts_per_tok=selected or 8)),
                                    "nvfp4", "mlp")
        main_lines, _, options = out.partition("options: ")
        predicted = plan(mb, "16GB", "96GB", links=Links()).report(mb, Links()).splitlines()[-1]
        assert main_lines.splitlines()[-1] == predicted and predicted.startswith("predicted: ")
        assert "measured on the embedded toy model (shakespeare-v3-tiny: 16 experts, top-4)" in options
        rows = re.findall(r"^([* ]) +(\d+) +([\d.]+) +([\d.]+ GB) +([\d.]+ GB) +(\S+) +([+\-\d.]+)% +([\d.]+) +"
                          r"([\d.]+)  \(k=(\d) of 4\)$", options, re.M)
        assert [int(r[1]) for r in rows] == [8, 6, 4, 2], options
        assert [r[0] for r in rows] == ["*" if int(r[1]) == selected else " " for r in rows]
        for mark, k, tok_s, h2d, disk, bound, inc, top1, kl, measured_k in rows:
            mb_k = ModelBytes.from_config(ModelConfig.from_dict(dict(MODELS["v3"], num_experts_per_tok=int(k))),
                                          "nvfp4", "mlp")
            p = plan(mb_k, "16GB", "96GB", links=Links())
            assert (tok_s, h2d, disk) == (f"{p.tokens_per_s:.2f}", f"{p.h2d_bytes_per_token / 1e9:.2f} GB",
                                          f"{p.disk_bytes_per_token / 1e9:.2f} GB"), (k, p)
            q = next(q for q in quality["rows"] if q["k"] * 8 == int(k) * 4)
            assert int(measured_k) == q["k"]
            assert (inc, top1, kl) == (f"{100 * q['perplexity_increase']:+.1f}", f"{q['top1_agreement']:.3f}",
                                       f"{q['kl_nats']:.3f}")
        assert rows[0][6:9] == ("+0.0", "1.000", "0.000")      # the model's own k costs nothing
        speeds = [float(r[2]) for r in rows]
        assert speeds == sorted(speeds) and speeds[1] > speeds[0], speeds


def test_demo_end_to_end(tmp_path, capsys):
    """The README's first command: embedded model -> FP4 store -> generation through all three tiers."""
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "converted to an NVFP4 store" in out and "GPU expert slots" in out
    moved = out.split("[dsjax demo] moved: ")[1].splitlines()[0]
    assert "disk->host" in moved and "host->GPU" in moved       # every tier did work
    assert (tmp_path / "demo" / "manifest.json").exists()
    assert "trained on Shakespeare" in out
    # What a newcomer asked: stand-in tiers on a CPU, compile time apart, what stage->pinned is, no "1 layers".
    assert "the 'GPU' and 'pinned host' tiers are stand-ins in CPU memory" in out
    assert "ms of it compiling (XLA compiles each kind of layer once" in out
    assert "stage->pinned: expert bytes read" in out
    assert "1 layers" not in out and "1 GPU layer slots" not in out
    # The suggested `dsjax plan` is the full command, and it works as printed.
    plan = out.split("try `dsjax plan ")[1].split("`")[0].split()
    assert "--max-gpu-layers" in plan and "--prefetch-layers" in plan
    assert main(["plan", *plan]) == 0 and "predicted:" in capsys.readouterr().out


def test_generate_from_store_with_runtime_options(tmp_path, capsys):
    from dsjax.demo import ensure_demo_store
    store = ensure_demo_store(str(tmp_path / "d"))          # the demo's store, without the demo's generation
    assert main(["generate", store, "--prompt", "Thou", "--max-new-tokens", "3", "--dtype", "float32",
                 "--gpu-memory", "7MB", "--host-memory", "7MB", "--set", "max_gpu_layers=1", "--set",
                 "prefetch_layers=1", "--set", "overlap_io=false", "--stats", "--stats-format", "prometheus"]) == 0
    err = capsys.readouterr().err
    assert "dsjax_pools_capacity{pool=\"expert_cache\"}" in err and "dsjax_links_bytes{link=\"host->GPU\"}" in err
    assert main(["generate", store, "--prompt", "x", "--set", "max_gpu_layers"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["plan", store, "--gpu-memory", "1GB", "--host-memory", "1GB"]) == 0
    assert "predicted:" in capsys.readouterr().out


def test_import_lifts_the_pinned_host_cap_unless_set():
    import os
    import subprocess
    import sys
    code = "import os, dsjax; print(os.environ['XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB'])"
    env = {k: v for k, v in os.environ.items() if k != "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"}
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) == max(1, int(0.9 * ram_gib))
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB="7"),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "7"                           # a user's setting is kept


def test_generate_prompt_from_stdin_or_an_error(demo_checkpoint, demo_engine, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("Shall I\n"))
    assert main(["generate", demo_checkpoint, "--max-new-tokens", "3", "--dtype", "float32", "--no-stream"]) == 0
    assert capsys.readouterr().out == demo_engine.generate("Shall I", max_new_tokens=3).text + "\n"

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr("sys.stdin", Terminal())
    assert main(["generate", demo_checkpoint]) == 2
    assert "no prompt; give --prompt TEXT (repeatable), or pipe the prompt on stdin" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["generate", demo_checkpoint, "--prompt", "-"]) == 2
    assert "the prompt read from stdin is empty" in capsys.readouterr().err


def test_generate_json_without_no_stream_prints_json(demo_checkpoint, demo_engine, capsys):
    assert main(["generate", demo_checkpoint, "--prompt", "Thou art", "--max-new-tokens", "3", "--json",
                 "--dtype", "float32"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["token_ids"] == demo_engine.generate("Thou art", max_new_tokens=3).token_ids


def test_generate_stats_say_unlimited(store, capsys):
    assert main(["generate", store, "--prompt", "Thou", "--max-new-tokens", "1", "--dtype", "float32",
                 "--stats"]) == 0
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    caps = {k: v["capacity"] for k, v in stats["pools"].items()}
    assert caps["reserve"] == "unlimited" and all(c == "unlimited" or c < 2**50 for c in caps.values()), caps


def test_info_and_plan_on_a_file_a_missing_path_and_a_store(store, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    assert main(["info", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt is a file, not a directory; give a Hugging Face checkpoint directory" in capsys.readouterr().err
    for cmd in ("info", "plan"):
        assert main([cmd, str(tmp_path / "missing")]) == 2
        assert "missing: no such file or directory" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "notes.txt")]) == 2
    assert "notes.txt: not valid JSON" in capsys.readouterr().err
    assert main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "4 layers (1 dense, 3 MoE)" in out and "dsjax store: nvfp4 (policy mlp)" in out


def test_help_describes_every_command(capsys):
    import pytest
    for cmd in ("info", "plan", "generate"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "usage:" in text and len(text.split("\n\n")[1]) > 40, text      # a description paragraph
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "dsjax store directory" in capsys.readouterr().out
