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


def test_plan_v3_from_config(tmp_path, capsys):
    from test_config import MODELS
    (tmp_path / "config.json").write_text(json.dumps(MODELS["v3"]))
    assert main(["plan", str(tmp_path), "--gpu-memory", "16GB", "--host-memory", "96GB"]) == 0
    out = capsys.readouterr().out
    assert "58 MoE x 256 experts of 24.77 MB" in out and "predicted:" in out and "bound by disk->host" in out
    assert main(["plan", str(tmp_path / "config.json"), "--gpu-memory", "2GB"]) == 2
    assert "too small" in capsys.readouterr().err
