"""The embedded Shakespeare model (dsjax/data/shakespeare-v3-tiny) in dsjax against Hugging Face transformers.

tests/oracle/make_embedded_reference.py loaded the shipped checkpoint with transformers' DeepseekV3ForCausalLM
(float32, eager) and recorded logits on held-out text, its routers' choices and a greedy continuation; torch is not
needed here.
"""

import os

import numpy as np
import pytest

import dsjax
from dsjax.demo import embedded_checkpoint
from tolerances import assert_close

REF = os.path.join(os.path.dirname(__file__), "data", "oracle_embedded", "reference.npz")


@pytest.fixture(scope="module")
def engine():
    return dsjax.load(embedded_checkpoint(), dtype="float32")


@pytest.fixture(scope="module")
def ref():
    return np.load(REF)


def test_logits_match_transformers(engine, ref):
    assert_close(engine.logits(ref["input_ids"]), ref["logits"], "logits_vs_hf_f32", "embedded model")


def test_greedy_continuation_matches_transformers(engine, ref):
    assert ref["greedy_margins"].min() > 1e-3       # every step's top-1 is clear, so equality is the right check
    g = engine.generate(ref["prompt_ids"][0].tolist(), max_new_tokens=ref["greedy_ids"].shape[1],
                        stop_token_ids=())
    assert g.token_ids == ref["greedy_ids"][0].tolist()


def test_tokenizer_matches_the_one_transformers_was_fed(engine, ref):
    import json
    meta = json.load(open(os.path.join(os.path.dirname(REF), "meta.json")))
    ids = engine.tokenizer.encode(meta["passages"][0])          # adds BOS, as the oracle did by hand
    assert ids[:ref["input_ids"].shape[1]] == ref["input_ids"][0].tolist()
