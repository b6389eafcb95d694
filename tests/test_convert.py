"""The converter (dsjax.store.writer, `dsjax convert`): policies and formats, FP8 and NVFP4 inputs, resuming,
clear errors, and the CLI. Every check reads real files written by the converter."""

import errno
import json
import os
import runpy
import sys

import ml_dtypes
import numpy as np
import pytest

import dsjax

from ckpt_builders import (
    assert_same_files, bf16_tensors, files_of, fp8_dequantized, linear_names, to_fp8, to_modelopt, write,
)
from dsjax.cli import main
from dsjax.quant import BLOCK_SIZES, QTensor, dequantize_np, quantize
from dsjax.store import writer
from dsjax.store.manifest import StoreError, read_manifest
from dsjax.store.reader import Store
from dsjax.store.safetensors_io import CheckpointError
from dsjax.store.writer import convert, quantize_banded

FMTS = ("nvfp4", "mxfp4")


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    cfg, cfg_dict, tensors = bf16_tensors()
    path = tmp_path_factory.mktemp("src") / "bf16"
    write(path, cfg_dict, tensors)
    return path, cfg, cfg_dict, tensors


@pytest.fixture(scope="module")
def clean_store(bf16_ckpt, tmp_path_factory):
    dst = tmp_path_factory.mktemp("clean") / "store"
    convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False)
    return dst


def _source_matrix(tensors, rec):
    """The source float32 weight of a manifest record ([E, N, K] for routed experts)."""
    if rec.tier == "experts":
        return np.stack([tensors[rec.hf_name.replace("*", str(e))].astype(np.float32) for e in range(rec.shape[0])])
    return tensors[rec.hf_name].astype(np.float32)


# Written out, not derived from dsjax.store.policy: the definition of each policy.
EXPERTS = {"experts_gate", "experts_up", "experts_down"}
MLP = EXPERTS | {"shared_gate", "shared_up", "shared_down", "gate", "up", "down"}
ATTENTION = {"q", "q_a", "q_b", "kv_a", "kv_b", "o"}
FP4_KEYS = {"experts": EXPERTS, "mlp": MLP, "all": MLP | ATTENTION, "all+lm_head": MLP | ATTENTION | {"lm_head"}}


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("policy", list(FP4_KEYS))
def test_policy_and_format_decide_every_tensor(bf16_ckpt, tmp_path, fmt, policy):
    """Each tensor is FP4 exactly when the policy selects it and K fits the block; the stored bits are `quantize`
    of the source (bf16 for the rest, routers float32); the manifest records shapes, bytes and the reason."""
    src, cfg, _, tensors = bf16_ckpt
    m = convert(src, tmp_path / "s", fmt, policy, progress=False)
    assert (m.fmt, m.policy, m.block_size) == (fmt, policy, BLOCK_SIZES[fmt])
    assert read_manifest(str(tmp_path / "s")).to_json() == m.to_json()
    with Store(tmp_path / "s") as store:
        core = store.read_core()
        for name, rec in m.tensors.items():
            key = name.rsplit(".", 1)[-1]
            want_fp4 = key in FP4_KEYS[policy] and rec.shape[-1] % {"nvfp4": 16, "mxfp4": 32}[fmt] == 0
            assert rec.is_fp4 == want_fp4, f"{name}: dtype {rec.dtype} under {fmt}/{policy}"
            if key in FP4_KEYS[policy] and not want_fp4:
                assert "not a multiple" in rec.note, name
            assert rec.bytes == sum(p.bytes for p in rec.parts.values())
            w = _source_matrix(tensors, rec)
            if rec.tier == "experts":
                parts = store.read_experts(int(name.split(".")[1]), range(rec.shape[0]),
                                           projections=[key[len("experts_"):]])[key[len("experts_"):]].result()
                got = QTensor(**parts, fmt=fmt) if rec.is_fp4 else parts["weight"]
            else:
                layer = core["layers"][int(name.split(".")[1])] if name.startswith("layers.") else core
                got = layer[key]
            if rec.is_fp4:
                want = quantize(w, fmt)
                for p in ("packed", "scales", "global_scale"):
                    np.testing.assert_array_equal(np.asarray(getattr(got, p)), getattr(want, p), err_msg=name)
            else:
                want_dtype = np.float32 if key in ("router", "router_bias") else ml_dtypes.bfloat16
                assert rec.dtype == np.dtype(want_dtype).name, name
                np.testing.assert_array_equal(np.asarray(got), w.astype(want_dtype), err_msg=name)


def test_banded_quantization_is_bit_exact():
    w = np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32) * np.linspace(0.1, 3, 37)[:, None]
    for fmt in FMTS:
        a, b = quantize_banded(w, fmt, band_bytes=5 * 64 * 4), quantize(w, fmt)   # 8 bands of 5 rows
        for p in ("packed", "scales", "global_scale"):
            np.testing.assert_array_equal(getattr(a, p), getattr(b, p), err_msg=f"{fmt} {p}")


def test_fp8_block_input_converts_like_its_dequantized_weights(bf16_ckpt, tmp_path):
    """DeepSeek FP8 (incl. 208-row dense MLP matrices: a partial 128-block) gives the same store as its float32
    dequantization: every file identical except the manifest, whose tensors differ only in source_dtype."""
    _, cfg, cfg_dict, tensors = bf16_ckpt
    fp8 = to_fp8(cfg, tensors)
    assert fp8["model.layers.0.mlp.gate_proj.weight"].shape == (208, 64)
    write(tmp_path / "fp8", dict(cfg_dict, quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                                "weight_block_size": [128, 128]}), fp8)
    write(tmp_path / "deq", cfg_dict, fp8_dequantized(cfg, fp8))
    a = convert(tmp_path / "fp8", tmp_path / "a", "nvfp4", "mlp", progress=False)
    b = convert(tmp_path / "deq", tmp_path / "b", "nvfp4", "mlp", progress=False)
    assert_same_files(tmp_path / "a", tmp_path / "b", skip=("manifest.json", "config.json"))
    assert a.source["tensor_dtypes"]["F8_E4M3"] == len(linear_names(cfg))
    for name, ra in a.tensors.items():
        rb = b.tensors[name]
        assert ra.to_json() | {"source_dtype": None} == rb.to_json() | {"source_dtype": None}, name


def test_modelopt_nvfp4_input_goes_in_bit_for_bit(bf16_ckpt, tmp_path):
    _, cfg, cfg_dict, tensors = bf16_ckpt
    mo, qc, written = to_modelopt(cfg, tensors)
    write(tmp_path / "mo", cfg_dict, mo, quant_config=qc)
    m = convert(tmp_path / "mo", tmp_path / "nv", "nvfp4", "experts", progress=False)
    assert m.source["hf_quant_config"]["exclude_modules"] == list(qc["quantization"]["exclude_modules"])
    with Store(tmp_path / "nv") as store:
        core = store.read_core()
        for name, rec in m.tensors.items():
            key = name.rsplit(".", 1)[-1]
            if rec.tier == "experts":
                layer, proj = int(name.split(".")[1]), key[len("experts_"):]
                parts = store.read_experts(layer, range(rec.shape[0]), projections=[proj])[proj].result()
                for e in range(rec.shape[0]):
                    q = written[rec.hf_name.replace("*", str(e))]
                    for p in ("packed", "scales", "global_scale"):
                        np.testing.assert_array_equal(parts[p][e], getattr(q, p), err_msg=f"{name} {e} {p}")
                continue
            got = (core["layers"][int(name.split(".")[1])] if name.startswith("layers.") else core)[key]
            if rec.hf_name in written:      # shared experts / dense MLP: NVFP4 kept although policy is `experts`
                assert rec.is_fp4 and rec.source_dtype == "NVFP4" and "kept NVFP4" in rec.note, name
                for p in ("packed", "scales", "global_scale"):
                    np.testing.assert_array_equal(np.asarray(getattr(got, p)), getattr(written[rec.hf_name], p))
            else:                           # excluded modules (attention, lm_head) and norms: plain bf16 as given
                assert not rec.is_fp4 and rec.source_dtype in ("BF16", "F32"), name
                np.testing.assert_array_equal(np.asarray(got), tensors[rec.hf_name], err_msg=name)
    # To MXFP4: dequantize, then requantize (documented); attention stays bf16 under `mlp`.
    mx = convert(tmp_path / "mo", tmp_path / "mx", "mxfp4", "mlp", progress=False)
    with Store(tmp_path / "mx") as store:
        rec = mx.tensors["layers.1.shared_up"]
        got = store.read_core_unit("layer_001")["shared_up"]
        want = quantize(dequantize_np(written[rec.hf_name]), "mxfp4")
        np.testing.assert_array_equal(np.asarray(got.packed), want.packed)
        assert mx.tensors["layers.1.q_a"].dtype == "bfloat16"


# ---- resuming -----------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_resume_after_interruption_between_units_is_byte_identical(bf16_ckpt, clean_store, tmp_path):
    def stop_after(n):
        seen = []

        def hook(unit):
            seen.append(unit)
            if len(seen) == n:
                raise Stop(unit)
        return hook

    dst = tmp_path / "s"
    with pytest.raises(Stop):
        convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False, on_unit=stop_after(3))
    assert not (dst / "manifest.json").exists() and len(os.listdir(dst / "progress")) == 4   # job + 3 units
    for call in (lambda: Store(dst), lambda: dsjax.load(dst)):     # load used to call it a Hugging Face checkpoint
        with pytest.raises(StoreError, match="this is an unfinished or damaged dsjax store.*re-run `dsjax convert"):
            call()
    resumed = []
    convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False, on_unit=resumed.append)
    assert resumed[0] == "layer_001.gate" and "embed" not in resumed      # continued at the first unfinished unit
    assert_same_files(dst, clean_store)


@pytest.mark.parametrize("workers", [1, 4])
def test_resume_after_a_kill_inside_an_expert_unit_is_byte_identical(bf16_ckpt, clean_store, tmp_path,
                                                                       monkeypatch, workers):
    """A crash in the middle of writing a shard (leftovers not cleaned, as after SIGKILL) is redone from scratch,
    also when the crash happens on one of several worker threads."""
    calls = {"n": 0}
    real = writer.quantize_banded

    def flaky(w, fmt, band_bytes=writer.DEFAULT_BAND_BYTES):
        calls["n"] += 1
        if calls["n"] == 16:            # inside layer_001.gate, after some experts went to disk
            raise Stop()
        return real(w, fmt, band_bytes)

    monkeypatch.setattr(writer, "quantize_banded", flaky)
    monkeypatch.setattr(writer.ShardWriter, "abort", lambda self: self._f.close())   # leave .partial behind
    dst = tmp_path / "s"
    with pytest.raises(Stop):
        convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False, workers=workers)
    assert any(k.endswith(".partial") for k in files_of(dst))
    monkeypatch.setattr(writer, "quantize_banded", real)
    convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False, workers=workers)
    assert_same_files(dst, clean_store)


def test_resume_after_a_kill_between_orbax_and_the_record_is_byte_identical(bf16_ckpt, clean_store, tmp_path,
                                                                             monkeypatch):
    """Killed after orbax renamed a core checkpoint into place but before it was normalized and recorded: the unit's
    directory exists yet is not trusted; the resumed run rewrites it."""
    real = writer._save_orbax

    def save_then_die(path, tree):
        if not path.endswith("layer_001"):
            return real(path, tree)
        import orbax.checkpoint as ocp
        ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=True, use_compression=False).save(
            os.path.abspath(path), tree)
        raise Stop()

    monkeypatch.setattr(writer, "_save_orbax", save_then_die)
    dst = tmp_path / "s"
    with pytest.raises(Stop):
        convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False)
    assert (dst / "core" / "layer_001" / "commit_success.txt").exists()      # orbax's own, unnormalized output
    monkeypatch.setattr(writer, "_save_orbax", real)
    convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False)
    assert_same_files(dst, clean_store)


def test_fused_expert_layout_converts_like_per_expert_names(bf16_ckpt, clean_store, tmp_path):
    """transformers-v5 fused experts (gate_up_proj [E, 2I, D], gate rows first; down_proj [E, D, I])."""
    _, cfg, cfg_dict, tensors = bf16_ckpt
    t = dict(tensors)
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        E = cfg.n_routed_experts
        per = {p: np.stack([t.pop(f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight") for e in range(E)])
               for p in ("gate", "up", "down")}
        t[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([per["gate"], per["up"]], axis=1)
        t[f"model.layers.{i}.mlp.experts.down_proj"] = per["down"]
    write(tmp_path / "fused", cfg_dict, t)
    convert(tmp_path / "fused", tmp_path / "s", "nvfp4", "mlp", progress=False)
    assert_same_files(tmp_path / "s", clean_store, skip=("manifest.json",))


def test_disk_full_is_clear_and_resumable(bf16_ckpt, clean_store, tmp_path, monkeypatch):
    real = writer.ShardWriter.append

    def full(self, a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.ShardWriter, "append", full)
    dst = tmp_path / "s"
    with pytest.raises(StoreError, match=rf"{dst}: disk full .* resumes at layer_001\.gate"):
        convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False)
    monkeypatch.setattr(writer.ShardWriter, "append", real)
    convert(bf16_ckpt[0], dst, "nvfp4", "mlp", progress=False)
    assert_same_files(dst, clean_store)
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(StoreError, match=r"not enough disk space: the rest of the store needs 0\.\d+ GB"):
        convert(bf16_ckpt[0], tmp_path / "t", "nvfp4", "mlp", progress=False)


# ---- parallel conversion -----------------------------------------------------------------------------
def jittered(fn):
    """fn delayed by 0-3 ms depending on its input's bytes, so worker threads finish out of order."""
    import time
    import zlib

    def slow(w, *a, **k):
        time.sleep((zlib.crc32(np.ascontiguousarray(w).view(np.uint8)) % 4) / 1000)
        return fn(w, *a, **k)
    return slow


@pytest.mark.parametrize("fmt,policy", [("nvfp4", "mlp"), ("mxfp4", "all")])
def test_workers_give_byte_identical_stores(bf16_ckpt, tmp_path, monkeypatch, fmt, policy):
    """Experts and tensors converted on 4 threads that finish out of order: every file, the manifest included, is the
    serial conversion's, byte for byte."""
    convert(bf16_ckpt[0], tmp_path / "serial", fmt, policy, progress=False, workers=1)
    monkeypatch.setattr(writer, "quantize_banded", jittered(writer.quantize_banded))
    convert(bf16_ckpt[0], tmp_path / "parallel", fmt, policy, progress=False, workers=4)
    assert_same_files(tmp_path / "parallel", tmp_path / "serial")


def test_map_ordered_keeps_order_bounds_the_window_and_raises_at_the_item():
    import threading
    import time
    held, peak, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        time.sleep((7 * i % 5) / 1000)
        if i == 13:
            raise Stop(i)
        return i

    got = []
    with pytest.raises(Stop, match="13"):
        for i in writer.map_ordered(work, range(40), 3):
            got.append(i)
            with lock:
                held[0] -= 1
    assert got == list(range(13)) and peak[0] <= 6               # in order; at most 2 x workers held at once
    assert list(writer.map_ordered(lambda i: i * i, range(5), 1)) == [0, 1, 4, 9, 16]


# ---- destinations and bad input -------------------------------------------------------------------
def test_destination_rules(bf16_ckpt, clean_store, tmp_path):
    src = bf16_ckpt[0]
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="exists and is a file"):
        convert(src, tmp_path / "file", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match=r"exists and is not a dsjax store \(it holds notes.txt\)"):
        convert(src, tmp_path / "other", progress=False)
    with pytest.raises(StoreError, match="already holds a complete dsjax store .* policy mlp"):
        convert(src, clean_store, "nvfp4", "all", progress=False)
    before = files_of(clean_store)
    assert convert(src, clean_store, "nvfp4", "mlp", progress=False).policy == "mlp"   # done already: no-op
    assert files_of(clean_store) == before
    with pytest.raises(Stop):
        convert(src, tmp_path / "half", "mxfp4", "mlp", progress=False, on_unit=lambda u: (_ for _ in ()).throw(Stop()))
    with pytest.raises(StoreError, match="unfinished conversion of a different job"):
        convert(src, tmp_path / "half", "nvfp4", "mlp", progress=False)
    (tmp_path / "empty").mkdir()
    convert(src, tmp_path / "empty", progress=False)                                   # empty dir is fine


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"),
     r"missing tensor 'model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight' \(expected shape \[48, 64\]\)"),
    (lambda t: t.__setitem__("model.layers.1.self_attn.o_proj.weight", np.zeros((64, 60), ml_dtypes.bfloat16)),
     r"'model\.layers\.1\.self_attn\.o_proj\.weight' has shape \[64, 60\], expected \[64, 64\]"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", np.zeros((208, 64), np.int8)),
     r"'model\.layers\.0\.mlp\.up_proj\.weight' has unsupported dtype I8"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", np.zeros((208, 64), ml_dtypes.float8_e4m3fn)),
     r"'model\.layers\.0\.mlp\.up_proj\.weight' has unsupported dtype F8_E4M3 \(no scale tensor"),
    (lambda t: t["model.layers.1.mlp.experts.2.down_proj.weight"].__setitem__((3, 4), np.nan),
     r"tensor 'model\.layers\.1\.mlp\.experts\.2\.down_proj\.weight' cannot be quantized: .*inf or NaN"),
], ids=["missing", "shape", "int8", "fp8-without-scale", "nan"])
def test_bad_source_fails_and_names_the_tensor(bf16_ckpt, tmp_path, mutate, match):
    _, _, cfg_dict, tensors = bf16_ckpt
    t = {k: v.copy() for k, v in tensors.items()}
    mutate(t)
    write(tmp_path / "bad", cfg_dict, t)
    with pytest.raises(CheckpointError, match=match):
        convert(tmp_path / "bad", tmp_path / "s", progress=False)
    # Header problems fail before anything is written; bad values (NaN) only when their tensor is reached.
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not (tmp_path / "s").exists() or "NaN" in match


def test_store_without_its_manifest_converts_again_in_place(bf16_ckpt, clean_store, tmp_path):
    """The message for a store without manifest.json says `dsjax convert` resumes: it must, journal or not."""
    import shutil
    shutil.copytree(clean_store, tmp_path / "s")
    os.remove(tmp_path / "s" / "manifest.json")
    (tmp_path / "s" / "core" / "embed" / "stale").write_text("left by whatever damaged it")
    convert(bf16_ckpt[0], tmp_path / "s", "nvfp4", "mlp", progress=False)
    assert_same_files(tmp_path / "s", clean_store)


def test_unwritable_destination_is_one_line_naming_it(bf16_ckpt, tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("x")
    dst = tmp_path / "file.txt" / "store"
    with pytest.raises(StoreError, match=r"file\.txt/store: cannot write the store there: Not a directory"):
        convert(bf16_ckpt[0], dst, progress=False)
    assert main(["convert", str(bf16_ckpt[0]), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsjax: error: ") and err.count("\n") == 1 and "cannot write the store there" in err
    assert (tmp_path / "file.txt").read_text() == "x"

    def refuse(path, tree):             # what a read-only filesystem or a permission says, mid-conversion
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(path, "_METADATA"))
    monkeypatch.setattr(writer, "_save_orbax", refuse)
    with pytest.raises(StoreError, match=r"s2: cannot write the store there: Permission denied \(at .*_METADATA\)"):
        convert(bf16_ckpt[0], tmp_path / "s2", progress=False)


@pytest.mark.parametrize("damage, match", [
    (lambda h: h.replace(b'"data_offsets"', b'"data_offsetz"', 1), r"missing field 'data_offsets'"),
    (lambda h: h.replace(b'"shape":[', b'"shape":{', 1), r"Expecting|delimiter|value"),
    (lambda h: h.replace(b'"dtype":"BF16"', b'"dtype":416000', 1), r"TypeError: dtype 416000 is not a string"),
], ids=["renamed-key", "broken-json", "wrong-type"])
def test_damaged_safetensors_header_names_the_file(bf16_ckpt, tmp_path, capsys, damage, match):
    _, _, cfg_dict, tensors = bf16_ckpt
    src = write(tmp_path / "src", cfg_dict, tensors)
    f = os.path.join(src, "model.safetensors")
    data = open(f, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = damage(data[8:8 + n])
    assert len(header) == n and header != data[8:8 + n]          # same length: only the JSON is damaged
    with open(f, "wb") as out:
        out.write(data[:8] + header + data[8 + n:])
    want = r"model\.safetensors: safetensors header is not valid \(.*(" + match + ")"
    with pytest.raises(CheckpointError, match=want):
        convert(src, tmp_path / "s", progress=False)
    with pytest.raises(CheckpointError, match=want):
        dsjax.load(src)
    assert main(["info", str(src)]) == 2
    assert "safetensors header is not valid" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_demo_store_made_before_sealed_manifests_is_rebuilt(bf16_ckpt, tmp_path):
    from dsjax.demo import ensure_demo_store
    store = ensure_demo_store(str(tmp_path / "demo"), checkpoint=str(bf16_ckpt[0]))
    m = json.loads((tmp_path / "demo" / "manifest.json").read_text())
    assert m["manifest_sha256"].startswith("sha256:")
    del m["manifest_sha256"]
    (tmp_path / "demo" / "manifest.json").write_text(json.dumps(m))
    assert ensure_demo_store(store, checkpoint=str(bf16_ckpt[0])) == store
    assert "manifest_sha256" in json.loads((tmp_path / "demo" / "manifest.json").read_text())


def test_unknown_format_policy_and_quant_algo(bf16_ckpt, tmp_path):
    with pytest.raises(ValueError, match="format 'int4' is not supported; choose one of mxfp4, nvfp4"):
        convert(bf16_ckpt[0], tmp_path / "s", "int4", progress=False)
    with pytest.raises(ValueError, match="policy 'most' is not known"):
        convert(bf16_ckpt[0], tmp_path / "s", "nvfp4", "most", progress=False)
    _, _, cfg_dict, tensors = bf16_ckpt
    write(tmp_path / "w8", cfg_dict, tensors, quant_config={"quantization": {"quant_algo": "W8A8", "group_size": 0}})
    with pytest.raises(CheckpointError, match="quant_algo 'W8A8'.* is not supported"):
        convert(tmp_path / "w8", tmp_path / "s", progress=False)


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_convert_and_verify(bf16_ckpt, tmp_path, capsys):
    src, dst = str(bf16_ckpt[0]), str(tmp_path / "s")
    assert main(["convert", src, dst, "--format", "mxfp4", "--policy", "all", "--no-progress", "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert "tensors" in out and "in mxfp4, policy all" in out
    assert main(["verify", dst]) == 0 and capsys.readouterr().out.strip().endswith(": OK")
    assert main(["convert", src, str(tmp_path / "s" / "manifest.json"), "--no-progress"]) == 2
    assert "exists and is a file" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a dsjax store (no manifest.json)" in capsys.readouterr().err
    shard = tmp_path / "s" / "experts" / "layer_001" / "up" / "scales" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[3 * 96 + 5] ^= 0x40                      # expert 3 of up/scales ([8, 48, 2] uint8: 96 bytes/expert)
    shard.write_bytes(bytes(data))
    assert main(["verify", dst]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and "layers.1.experts_up part scales expert 3: crc32" in out


@pytest.mark.parametrize("cmd", ["convert", "verify"])
def test_cli_help_documents_every_flag(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = ["SRC", "DST", "--format", "--policy", "--no-progress", "--workers"] if cmd == "convert" else ["STORE"]
    for f in flags:
        assert f in text
    assert text.count("default") >= (2 if cmd == "convert" else 0)


def test_checkpoints_convert_script(bf16_ckpt, tmp_path, monkeypatch, capsys):
    script = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "convert.py")
    monkeypatch.setattr(sys, "argv", [script, str(bf16_ckpt[0]), str(tmp_path / "s"), "--format", "nvfp4",
                                      "--policy", "experts", "--no-progress"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 0
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["quantization"]["policy"] == "experts"
