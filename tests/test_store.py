"""The store (dsjax.store.reader / verify): layout, expert reads, caller buffers, concurrency, memory kinds, loading
through dsjax.load, FP4 quality against the bf16 model, and corruption reported with the tensor's name."""

import gc
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax
from ckpt_builders import ORACLE, bf16_tensors, write
from dsjax.model import forward
from dsjax.quant import QTensor, dequantize_np, quantize
from dsjax.store.manifest import StoreCorruptError, StoreError
from dsjax.store.reader import Store
from dsjax.store.verify import verify
from dsjax.store.writer import convert
from dsjax.store.zarr_shard import read_shard_index, shard_file
from tolerances import rel_l2

# The one table of tolerances for this file.
#   store_vs_dequantized: dsjax.load(store) against forward() on the store's tensors dequantized in numpy, float32
#                         (same math; only the order of XLA's float32 dots may differ).
#   quality[policy]:      loose sanity bounds for FP4 vs the bf16 model on the tiny v3 oracle (measured: experts
#                         0.12-0.15 rel / KL 0.005-0.007 / top-1 0.78-0.84; mlp 0.36-0.40 / 0.04-0.05 / 0.54-0.56;
#                         docs/fp4_quality.md). A broken format gives rel ~1, KL > 1 and top-1 near 1/512.
TOL = {
    "store_vs_dequantized": 1e-5,
    "quality": {"experts": dict(logits_rel=0.25, kl=0.02, top1=0.7), "mlp": dict(logits_rel=0.6, kl=0.1, top1=0.4)},
}
PARTS = ("packed", "scales", "global_scale")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 2-layer V3-style checkpoint (8 experts) and its nvfp4 store under policy `all`, with the demo tokenizer."""
    from dsjax.demo import write_demo_checkpoint
    base = tmp_path_factory.mktemp("small")
    demo = write_demo_checkpoint(str(base / "demo"))
    cfg, cfg_dict, tensors = bf16_tensors(vocab_size=512)      # the demo tokenizer's vocabulary
    write(base / "src", cfg_dict, tensors, tokenizer_from=demo)
    convert(base / "src", base / "store", "nvfp4", "all", progress=False)
    return base / "store", cfg, tensors


@pytest.fixture
def damaged(small, tmp_path):
    """A private copy of the small store to break."""
    shutil.copytree(small[0], tmp_path / "store")
    return tmp_path / "store"


def _expert(tensors, layer, proj, e):
    return tensors[f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"].astype(np.float32)


# ---- layout ------------------------------------------------------------------------------------------
def test_layout_one_file_per_array_one_contiguous_chunk_per_expert(small):
    store, cfg, _ = small
    top = sorted(os.listdir(store))
    assert top == ["config.json", "core", "experts", "manifest.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(store / "core")) == ["embed", "head", "layer_000", "layer_001"]
    assert os.listdir(store / "experts") == ["layer_001"]
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    for proj, (N, K) in {"gate": (I, D), "up": (I, D), "down": (D, I)}.items():
        for part, (shape, itemsize) in {"packed": ((E, N, K // 2), 1), "scales": ((E, N, K // 16), 1),
                                        "global_scale": ((E,), 4)}.items():
            path = store / "experts" / "layer_001" / proj / part
            files = [os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs]
            assert sorted(files) == sorted(["zarr.json", os.path.relpath(shard_file(str(path), len(shape)), path)])
            chunk = int(np.prod(shape[1:])) * itemsize
            assert os.path.getsize(shard_file(str(path), len(shape))) == E * chunk + 16 * E + 4   # data + index
            idx = read_shard_index(str(path), len(shape), E)
            np.testing.assert_array_equal(idx[:, 0], np.arange(E) * chunk)      # expert e = bytes [e*c, (e+1)*c)
            np.testing.assert_array_equal(idx[:, 1], np.full(E, chunk))


# ---- expert reads ------------------------------------------------------------------------------------
def test_read_experts_is_bit_identical_to_quantize(small):
    store, _, tensors = small
    ids = [5, 0, 7, 5]                                 # any order, repeats allowed
    with Store(store) as s:
        futs = s.read_experts(1, ids)
        assert sorted(futs) == ["down", "gate", "up"]
        for proj, fut in futs.items():
            got = fut.result()
            for j, e in enumerate(ids):
                want = quantize(_expert(tensors, 1, proj, e), "nvfp4")
                for p in PARTS:
                    np.testing.assert_array_equal(got[p][j], getattr(want, p), err_msg=f"{proj} expert {e} {p}")


def test_read_experts_fills_caller_buffers(small):
    store, cfg, tensors = small
    with Store(store) as s:
        rec = s.expert_record(1, "down")
        out = {"down": {p: np.full((2,) + rec.parts[p].shape[1:], 0xAB if p != "global_scale" else -1,
                                   dtype=rec.parts[p].dtype) for p in PARTS}}
        got = s.read_experts(1, [3, 6], out=out, projections=["down"])["down"].result()
        for p in PARTS:
            assert got[p] is out["down"][p]
        want = quantize(np.stack([_expert(tensors, 1, "down", e) for e in (3, 6)]), "nvfp4")
        for p in PARTS:
            np.testing.assert_array_equal(out["down"][p], getattr(want, p))
        bad = {"down": dict(out["down"], scales=np.zeros((3, 1), np.uint8))}
        with pytest.raises(ValueError, match=r"out\['down'\]\['scales'\] must be a writable C-contiguous "
                                             r"uint8\[2, 64, 3\] array, got uint8\[3, 1\]"):
            s.read_experts(1, [3, 6], out=bad, projections=["down"])
        with pytest.raises(IndexError, match=r"outside \[0, 8\)"):
            s.read_experts(1, [8])
        with pytest.raises(StoreError, match="layer 0 is not an MoE layer"):
            s.read_experts(0, [0])


def test_io_concurrency_bound_reaches_the_opened_arrays(small):
    """The TensorStore context that every expert array is opened with carries the requested pread limit and a
    zero-byte cache pool."""
    store = small[0]
    for limit in (1, 3):
        with Store(store, io_concurrency=limit) as s:
            assert s.read_experts(1, [2])["up"].result()["packed"].shape[0] == 1
            specs = [a.spec(retain_context=True).to_json()["context"] for a in s._arrays.values()]
            assert len(specs) == 9
            for c in specs:
                assert c["file_io_concurrency"] == {"limit": limit}
                assert c["cache_pool"] in ({}, {"total_bytes_limit": 0})   # 0 is the default, printed as {}


# ---- core and memory kinds ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pinned_host", "device"])
def test_read_core_restores_into_the_requested_memory_kind(small, kind):
    store, cfg, tensors = small
    with Store(store) as s:
        core = s.read_core(memory_kind=kind)
    leaves = jax.tree.leaves(core)
    assert leaves and all(a.sharding.memory_kind == kind for a in leaves)
    assert isinstance(core["layers"][1]["q_a"], QTensor) and "experts_gate" not in core["layers"][1]
    assert core["embed"].dtype == jnp.bfloat16 and core["layers"][1]["router"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(core["embed"]), tensors["model.embed_tokens.weight"])


def test_unknown_memory_kind_names_the_choices(small):
    with Store(small[0]) as s, pytest.raises(ValueError, match=r"memory_kind 'hbm' is not available .* one of"):
        s.read_core(memory_kind="hbm")


# ---- loading and quality -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v3_stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("v3")
    out = {}
    for fmt in ("nvfp4", "mxfp4"):
        for policy in ("experts", "mlp"):
            convert(os.path.join(ORACLE, "v3"), base / f"{fmt}-{policy}", fmt, policy, progress=False)
            out[fmt, policy] = base / f"{fmt}-{policy}"
    return out


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_load_store_equals_the_model_on_its_dequantized_tensors(v3_stores, fmt):
    """The oracle never reads the store: the source weights, with every tensor the manifest marks FP4 replaced by
    dequantize_np(quantize(W)) (what test_convert proves the store holds) and the rest rounded to bf16."""
    from dsjax.store.hf_names import read_global, read_layer
    from dsjax.store.safetensors_io import Checkpoint
    store = v3_stores[fmt, "mlp"]
    ids = np.load(os.path.join(ORACLE, "v3", "reference.npz"))["input_ids"]
    got = dsjax.load(store, dtype="float32").logits(ids)
    with Store(store) as s:
        cfg, fp4 = s.config, {n for n, r in s.manifest.tensors.items() if r.is_fp4}
    ck = Checkpoint(os.path.join(ORACLE, "v3"))

    def oracle(name, key, w):
        w = np.asarray(w, np.float32)
        if name in fp4:
            return dequantize_np(quantize(w, fmt))
        return w if key in ("router", "router_bias") else w.astype(jnp.bfloat16).astype(np.float32)

    dense = {k: oracle(k, k, read_global(ck, cfg, k, np.float32)) for k in ("embed", "final_norm", "lm_head")}
    dense["layers"] = [{k: oracle(f"layers.{i}.{k}", k, v) for k, v in read_layer(ck, cfg, i, np.float32).items()}
                       for i in range(cfg.num_hidden_layers)]
    want = np.asarray(forward(jax.tree.map(jnp.asarray, dense), jnp.asarray(ids), cfg))
    with Store(store) as s:
        in_memory = dsjax.Engine(cfg, s.load_weights(jnp.float32)).logits(ids)     # the all-in-memory path
    for what, logits in (("dsjax.load", got), ("Store.load_weights", in_memory)):
        err = rel_l2(logits, want)
        assert err <= TOL["store_vs_dequantized"], (f"{fmt} {what}: logits vs dequantized model: rel L2 {err:.2e}, "
                                                    f"max-abs {np.abs(logits - want).max():.2e}")


def _quality(got, ref):
    lp = jax.nn.log_softmax(jnp.asarray(ref, jnp.float64 if jax.config.x64_enabled else jnp.float32))
    lq = jax.nn.log_softmax(jnp.asarray(got, lp.dtype))
    kl = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    return dict(logits_rel=rel_l2(got, ref), kl=kl, top1=float((got.argmax(-1) == ref.argmax(-1)).mean()))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_quality_against_the_bf16_model(v3_stores, fmt):
    ids = np.load(os.path.join(ORACLE, "v3", "reference.npz"))["input_ids"]
    ref = dsjax.load(os.path.join(ORACLE, "v3"), dtype="float32").logits(ids)
    q = {p: _quality(dsjax.load(v3_stores[fmt, p], dtype="float32").logits(ids), ref) for p in ("experts", "mlp")}
    for p, m in q.items():
        b = TOL["quality"][p]
        assert m["logits_rel"] <= b["logits_rel"] and m["kl"] <= b["kl"] and m["top1"] >= b["top1"], \
            f"{fmt}/{p}: {m} outside {b}"
    assert q["experts"]["kl"] < q["mlp"]["kl"], f"{fmt}: quantizing more should cost more: {q}"


def test_store_is_self_contained_with_tokenizer(small):
    eng = dsjax.load(small[0], dtype="float32")
    assert eng.tokenizer is not None and eng.config == small[1]
    assert eng.tokenizer.decode(eng.tokenizer.encode("Shall I compare", add_bos=False)) == "Shall I compare"


# ---- damage --------------------------------------------------------------------------------------------
def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_expert_byte_fails_only_that_expert(damaged):
    with Store(damaged) as s:
        rec = s.expert_record(1, "gate")
    chunk = rec.parts["packed"].bytes // rec.shape[0]
    _flip(damaged / "experts/layer_001/gate/packed/c/0/0/0", 5 * chunk + 17)
    with Store(damaged) as s:
        s.read_experts(1, [4, 6, 0])["gate"].result()                       # neighbours read fine
        with pytest.raises(StoreCorruptError, match=r"routed expert 5 of layers\.1\.experts_gate "
                                                    r"\(model\.layers\.1\.mlp\.experts\.5\.gate_proj\.weight\) part "
                                                    r"packed: crc32 .*run `dsjax verify"):
            s.read_experts(1, [4, 5])["gate"].result()
    rep = verify(damaged)
    assert [(p.tensor, p.part, p.expert) for p in rep.problems] == [("layers.1.experts_gate", "packed", 5)]
    with Store(damaged) as s, pytest.raises(StoreCorruptError, match=r"routed expert 5 of layers\.1\.experts_gate"):
        s.load_weights(jnp.float32)


def test_truncated_expert_file_is_named(damaged):
    f = damaged / "experts/layer_001/up/scales/c/0/0/0"
    f.write_bytes(f.read_bytes()[:-100])
    rep = verify(damaged)
    assert len(rep.problems) == 1 and rep.problems[0].tensor == "layers.1.experts_up"
    assert "truncated" in str(rep.problems[0]) and "layers.1.experts_up part scales" in rep.summary()
    with Store(damaged) as s, pytest.raises(StoreCorruptError, match=r"layers\.1\.experts_up .* part scales .* "
                                                                      r"read failed"):
        s.read_experts(1, [0])["up"].result()


def test_flipped_core_byte_is_named_by_verify_read_core_and_load_weights(damaged):
    f = damaged / "core/layer_001/o.packed/c/0/0"
    _flip(f, 3)           # a data byte: orbax's zarr3 protects only the shard index, so only our crc32 sees it
    rep = verify(damaged)
    assert [(p.tensor, p.part) for p in rep.problems] == [("layers.1.o", "packed")]
    with Store(damaged) as s, pytest.raises(StoreCorruptError, match=r"tensor layers\.1\.o "
                                                                      r"\(model\.layers\.1\.self_attn\.o_proj"
                                                                      r"\.weight\) part packed"):
        s.read_core()
    with Store(damaged) as s, pytest.raises(StoreCorruptError, match=r"layers\.1\.o "):
        s.load_weights(jnp.float32)


# After a failed read, orbax closes its asyncio loop before TensorStore's callbacks land: harmless "Event loop is
# closed" / unclosed-TensorStore noise, collected here so it cannot leak into the next test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_core_index_is_named(damaged):
    f = damaged / "core/layer_000/kv_b.packed/c/0/0"
    _flip(f, len(f.read_bytes()) - 7)                                          # inside the shard index + crc32c
    rep = verify(damaged)
    assert [p.tensor for p in rep.problems] == ["layers.0.kv_b"] and "cannot be restored" in rep.summary()
    with Store(damaged) as s, pytest.raises(StoreCorruptError, match=r"tensor layers\.0\.kv_b .* cannot be restored"):
        s.read_core_unit("layer_000")
    gc.collect()


def test_missing_copied_file_and_bad_manifest(damaged, tmp_path):
    os.remove(damaged / "tokenizer.json")
    assert [str(p) for p in verify(damaged).problems] == ["tokenizer.json: file is missing"]
    m = (damaged / "manifest.json").read_text()
    (damaged / "manifest.json").write_text(m.replace('"schema_version": 1', '"schema_version": 99'))
    with pytest.raises(StoreError, match="schema version 99 is not the 1 this dsjax reads; re-convert"):
        Store(damaged)
    (damaged / "manifest.json").write_text(m[:100])
    with pytest.raises(StoreCorruptError, match="unreadable manifest"):
        Store(damaged)
    with pytest.raises(StoreError, match="not a dsjax store"):
        Store(tmp_path)


# ---- the manifest's own checksum ---------------------------------------------------------------------
def test_manifest_edited_is_refused_by_verify_load_and_the_cli(damaged, capsys):
    """An edited model config breaks no tensor checksum but changes every token: the manifest seals itself."""
    from dsjax.cli import main
    m = json.loads((damaged / "manifest.json").read_text())
    assert m["manifest_sha256"].startswith("sha256:")
    m["model_config"]["routed_scaling_factor"] = 0.1
    (damaged / "manifest.json").write_text(json.dumps(m, indent=1))
    match = r"manifest\.json: manifest\.json was edited or damaged .*convert the checkpoint again"
    with pytest.raises(StoreCorruptError, match=match):
        verify(damaged)
    with pytest.raises(StoreCorruptError, match=match):
        Store(damaged)
    with pytest.raises(StoreCorruptError, match=match):
        dsjax.load(damaged, dtype="float32")
    assert main(["verify", str(damaged)]) == 1
    assert "manifest.json was edited or damaged" in capsys.readouterr().out
    assert main(["generate", str(damaged), "--prompt", "x"]) == 2
    assert "manifest.json was edited or damaged" in capsys.readouterr().err


def test_manifest_reformatted_is_accepted_and_one_without_a_checksum_loads_with_a_warning(damaged):
    m = json.loads((damaged / "manifest.json").read_text())
    (damaged / "manifest.json").write_text(json.dumps(m, indent=4, sort_keys=True))   # same content, other bytes
    assert verify(damaged).ok and not verify(damaged).warnings
    del m["manifest_sha256"]                     # a store converted before manifests carried their own checksum
    (damaged / "manifest.json").write_text(json.dumps(m))
    with Store(damaged) as s:
        assert s.config.routed_scaling_factor == 2.5 and not s.manifest.sealed
    rep = verify(damaged)
    assert rep.ok and "has no manifest_sha256" in rep.warnings[0] and "warning: manifest.json" in rep.summary()


# ---- expert counts that are not a multiple of the read batch ------------------------------------------
@pytest.mark.parametrize("n_experts", [12, 60, 72])
def test_expert_counts_not_a_multiple_of_the_read_batch(small, tmp_path, n_experts):
    """A Kimi-like routing (top-2, one group): verify read batches of 8 past the last expert (OUT_OF_RANGE)."""
    cfg, cfg_dict, tensors = bf16_tensors(vocab_size=512, n_routed_experts=n_experts, num_experts_per_tok=2,
                                          n_group=1, topk_group=1)
    write(tmp_path / "src", cfg_dict, tensors, tokenizer_from=small[0])
    convert(tmp_path / "src", tmp_path / "store", "nvfp4", "mlp", progress=False)
    for batch in (8, 16, 5):
        rep = verify(tmp_path / "store", expert_batch=batch)
        assert rep.ok, rep.summary()
    with Store(tmp_path / "store") as s:
        last = s.read_experts(1, [n_experts - 1, 0])["down"].result()["packed"]
        want = quantize(_expert(tensors, 1, "down", n_experts - 1), "nvfp4").packed
        np.testing.assert_array_equal(last[0], want)
    if n_experts == 12:         # generation through the tiers under tight budgets: experts read from disk
        from dsjax.demo import demo_budgets
        tiered = dsjax.load(tmp_path / "store", dtype="float32", **demo_budgets(str(tmp_path / "store")))
        assert len(tiered.generate("Shall I", max_new_tokens=1).token_ids) == 1
        assert tiered.stats()["links"]["disk->host"]["copies"] > 0


# ---- a store without its manifest ---------------------------------------------------------------------
def test_store_without_manifest_is_called_an_unfinished_store(damaged, capsys):
    from dsjax.cli import main
    os.remove(damaged / "manifest.json")
    match = r"this is an unfinished or damaged dsjax store .*re-run `dsjax convert SRC .*` to resume, or `dsjax verify"
    for call in (lambda: dsjax.load(damaged), lambda: Store(damaged), lambda: verify(damaged)):
        with pytest.raises(StoreError, match=match):
            call()
    for cmd in (["generate", str(damaged), "--prompt", "x"], ["info", str(damaged)], ["plan", str(damaged)],
                ["verify", str(damaged)]):
        assert main(cmd) == 2, cmd
        assert "this is an unfinished or damaged dsjax store" in capsys.readouterr().err, cmd
