"""dsjax against Hugging Face transformers (the oracle): logits, absorbed decode, and 32 greedy tokens.

The reference data was produced by tests/oracle/make_reference.py (torch, CPU, float32) and is committed; torch is
not needed here. Checkpoints are stored in bf16; the float32 forward upcasts them, like the oracle did.
"""

import os

import numpy as np
import pytest

import dsjax
from tolerances import TOL, assert_bf16_close, assert_close, rel_l2

ORACLE = os.path.join(os.path.dirname(__file__), "data", "oracle")
NAMES = sorted(d for d in os.listdir(ORACLE) if os.path.exists(os.path.join(ORACLE, d, "reference.npz")))


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    path = os.path.join(ORACLE, request.param)
    return request.param, dsjax.load(path, dtype="float32"), np.load(os.path.join(path, "reference.npz"))


def test_oracle_covers_the_required_configs():
    assert {"v3", "v2_lite", "moonlight"} <= set(NAMES)


def test_logits_match_transformers(case):
    name, engine, ref = case
    assert ref["token_ok"].all()  # the oracle chose seeds with clear routing margins everywhere
    assert_close(engine.logits(ref["input_ids"]), ref["logits"], "logits_vs_hf_f32", name)


def test_absorbed_prefill_matches_transformers(case):
    name, engine, ref = case
    absorbed = dsjax.Engine(engine.config, engine.weights, engine.tokenizer, prefill_form="absorbed")
    assert_close(absorbed.logits(ref["input_ids"]), ref["logits"], "logits_vs_hf_f32", f"{name} absorbed")


def test_greedy_tokens_match_transformers(case):
    name, engine, ref = case
    g = engine.generate(ref["prompt_ids"][0].tolist(), max_new_tokens=32, stop_token_ids=())
    assert g.token_ids == ref["greedy_ids"][0].tolist(), f"{name}: greedy continuation differs"


def test_decode_logits_follow_the_full_forward(case):
    """Per-step decode logits (absorbed, compressed cache) against the oracle's full-sequence logits."""
    name, engine, ref = case
    ids = ref["input_ids"]
    steps = []
    for ev in _decode_logits(engine, ids[:, :40], ids[:, 40:]):
        steps.append(ev)
    got = np.stack(steps, axis=1)  # [B, 40, V]
    err = rel_l2(got, ref["logits"][:, 39:79])
    assert err <= TOL["logits_vs_hf_f32"], f"{name}: decode logits rel L2 {err:.2e}"


def _decode_logits(engine, prompt, forced):
    """Teacher-forced decode: prefill `prompt`, then feed `forced` tokens one at a time; yields logits [B, V]. Runs
    the engine's own forward (prefill form naive, then absorbed decode steps) on a private cache."""
    from dsjax.runtime.engine import Group
    B, P = prompt.shape
    caches = engine._new_caches(B, P + forced.shape[1])
    prefill = Group(prompt, np.broadcast_to(np.arange(P, dtype=np.int32), (B, P)), None, np.ones((B, P), bool),
                    np.full(B, P - 1, np.int32), "naive")
    yield np.asarray(engine._call(lambda: engine._forward([prefill], caches)[0]))[:, 0]
    for t in range(forced.shape[1] - 1):
        step = Group(forced[:, t:t + 1], np.full((B, 1), P + t, np.int32), None, np.ones((B, 1), bool),
                     np.zeros(B, np.int32), "absorbed")
        yield np.asarray(engine._call(lambda: engine._forward([step], caches)[0]))[:, 0]


def test_bf16_logits_near_the_float32_oracle(case):
    name, engine, ref = case
    path = os.path.join(ORACLE, name)
    bf16 = dsjax.load(path, dtype="bfloat16")
    assert_bf16_close(bf16.logits(ref["input_ids"]), ref["logits"], f"{name} bf16")
