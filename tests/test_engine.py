"""The public generation API on the embedded demo model: generate vs an independent argmax loop over full forwards,
streaming, sampling controls, stop conditions, chat template and bad prompts."""

import numpy as np
import pytest

import dsjax
from dsjax import PromptError, SamplingParams


def _greedy_by_full_forward(engine, prompt, n, width=32):
    """Oracle for the decode loop: recompute the whole sequence each step and take the argmax at its last position.
    The sequence is right-padded to `width` tokens so that every step runs one forward shape (one compile, not one
    per length): the model is causal, so what follows a position cannot change its logits."""
    seq = list(prompt)
    assert len(seq) + n <= width
    for _ in range(n):
        padded = np.asarray(seq + [0] * (width - len(seq)))[None]
        seq.append(int(engine.logits(padded)[0, len(seq) - 1].argmax()))
    return seq[len(prompt):]


def test_greedy_generate_matches_full_forward_argmax(demo_engine):
    prompts = [[0, 17, 42, 99, 7], [0, 5, 6, 250, 251, 3, 9, 11, 300, 2, 13]]  # ragged batch
    gens = demo_engine.generate(prompts, max_new_tokens=12, stop_token_ids=())
    for p, g in zip(prompts, gens):
        assert g.prompt_ids == p
        expect = _greedy_by_full_forward(demo_engine, p, 12)
        eos = demo_engine.tokenizer.eos_id
        if eos in expect:  # the engine stops at EOS; the oracle does not
            expect = expect[: expect.index(eos) + 1]
        assert g.token_ids == expect


def test_single_prompt_forms(demo_engine):
    text = demo_engine.generate("Shall I compare thee", max_new_tokens=4)
    ids = demo_engine.generate(demo_engine.tokenizer.encode("Shall I compare thee"), max_new_tokens=4)
    assert isinstance(text, dsjax.Generation) and text.token_ids == ids.token_ids
    assert text.prompt_ids[0] == demo_engine.tokenizer.bos_id  # add_bos_token from tokenizer_config.json
    many = demo_engine.generate(["Shall I compare thee", "Thou art"], max_new_tokens=4)
    assert isinstance(many, list) and many[0].token_ids == text.token_ids


def test_stream_equals_generate(demo_engine):
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=3)
    g = demo_engine.generate(["Rough winds", "And summer"], **kw)
    events = list(demo_engine.stream(["Rough winds", "And summer"], **kw))
    for b in range(2):
        evs = [e for e in events if e.seq == b]
        assert [e.token_id for e in evs] == g[b].token_ids
        assert "".join(e.text for e in evs) == g[b].text
        assert evs[-1].finished and not any(e.finished for e in evs[:-1])
        assert evs[-1].finish_reason == g[b].finish_reason


def test_sampling_is_seeded_and_batch_independent(demo_engine):
    kw = dict(max_new_tokens=12, temperature=1.0)
    a = demo_engine.generate("Sometime too hot", seed=1, **kw)
    assert demo_engine.generate("Sometime too hot", seed=1, **kw).token_ids == a.token_ids
    assert demo_engine.generate("Sometime too hot", seed=2, **kw).token_ids != a.token_ids
    batched = demo_engine.generate(["Sometime too hot", "By chance"], seed=1, **kw)
    assert batched[0].token_ids == a.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(demo_engine):
    greedy = demo_engine.generate("Nor shall death", max_new_tokens=10, stop_token_ids=())
    assert demo_engine.generate("Nor shall death", max_new_tokens=10, temperature=1.5, top_k=1,
                                seed=5).token_ids == greedy.token_ids
    assert demo_engine.generate("Nor shall death", max_new_tokens=10, temperature=1.5, top_p=1e-6,
                                seed=5).token_ids == greedy.token_ids


def test_top_k_restricts_the_support(demo_engine):
    """Every sampled token under top_k=3 is among the 3 most likely next tokens of its prefix."""
    g = demo_engine.generate("So long lives", max_new_tokens=8, temperature=2.0, top_k=3, seed=0)
    seq = list(g.prompt_ids)
    for t in g.token_ids:
        top3 = np.argsort(demo_engine.logits(np.asarray(seq)[None])[0, -1])[-3:]
        assert t in top3
        seq.append(t)


def test_stop_string_cuts_text(demo_engine):
    free = demo_engine.generate("Thou art", max_new_tokens=16, temperature=1.0, seed=4)
    stop = free.text[3:6]
    assert len(stop) == 3
    g = demo_engine.generate("Thou art", max_new_tokens=16, temperature=1.0, seed=4, stop=stop)
    assert g.finish_reason == "stop" and g.text == free.text[: free.text.index(stop)]
    assert g.token_ids == free.token_ids[: len(g.token_ids)] and len(g.token_ids) < 16


def test_stop_token_and_length(demo_engine):
    free = demo_engine.generate("When in eternal", max_new_tokens=6, stop_token_ids=())
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    g = demo_engine.generate("When in eternal", max_new_tokens=6, stop_token_ids=[free.token_ids[2]])
    assert g.finish_reason == "stop" and g.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]


def test_chat_messages_use_the_template(demo_engine):
    tok = demo_engine.tokenizer
    g = demo_engine.generate([{"role": "user", "content": "Shall I"}], max_new_tokens=2)
    text = tok.decode(g.prompt_ids, skip_special_tokens=False)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>Shall I<｜Assistant｜>"
    assert demo_engine.generate("Shall I", chat=True, max_new_tokens=2).prompt_ids == g.prompt_ids


def test_prompt_longer_than_context_is_rejected(demo_engine):
    limit = demo_engine.config.max_position_embeddings
    with pytest.raises(PromptError, match=f"context limit is {limit}"):
        demo_engine.generate([1] * limit, max_new_tokens=1)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        demo_engine.generate([1, demo_engine.config.vocab_size], max_new_tokens=1)
    with pytest.raises(PromptError, match="empty"):
        demo_engine.generate([[]], max_new_tokens=1)


def test_generation_stops_at_the_context_limit(demo_engine):
    limit = demo_engine.config.max_position_embeddings
    g = demo_engine.generate([5] * (limit - 3), max_new_tokens=10, stop_token_ids=())
    assert g.finish_reason == "length" and len(g.token_ids) == 3


def test_bad_sampling_params_name_the_field():
    for kw, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
                      (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)


def test_stats_after_generation(demo_engine):
    demo_engine.generate(["Shall I", "Thou"], max_new_tokens=5, stop_token_ids=())
    s = demo_engine.stats()
    assert s["batch"] == 2 and s["generated_tokens"] <= 10 and s["ttft_s"] > 0 and s["decode_tok_s"] > 0


# ---- bad input and the figures every path reports (issue 23) ------------------------------------------------------

def test_zero_budgets_are_budgets_of_zero_bytes(store):
    """0 is a budget of zero bytes (too small, naming the minimum), as in `dsjax plan`; None is no limit."""
    from dsjax.runtime.planner import BudgetError
    with pytest.raises(BudgetError, match="gpu_memory 0 B is too small.*minimum is about"):
        dsjax.load(store, gpu_memory=0)
    with pytest.raises(BudgetError, match="host_memory 0 B is too small.*minimum is about"):
        dsjax.load(store, gpu_memory="1GB", host_memory="0")


def test_expert_activations_are_counted_on_every_path(store, demo_engine):
    """Every routed token-expert pair is counted, whether experts stream (budget), all sit on the GPU (no budget),
    or the model is one plain pytree (in_memory, a Hugging Face checkpoint): top_k pairs per real token per MoE
    layer, padding excluded."""
    prompt = [0, 17, 42, 99, 7, 3, 5]
    engines = {"no budget": dsjax.load(store, dtype="float32"), "in_memory": dsjax.load(store, dtype="float32",
               in_memory=True), "hf": demo_engine}
    cfg = demo_engine.config
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    for name, e in engines.items():
        before = np.asarray(e.stats()["expert_activations"], np.int64)
        g = e.generate(prompt, max_new_tokens=4, stop_token_ids=())
        after = np.asarray(e.stats()["expert_activations"], np.int64)
        tokens = len(prompt) + len(g.token_ids) - 1        # the last generated token is never fed back
        for i in moe:
            assert (after[i] - before[i]).sum() == tokens * cfg.num_experts_per_tok, (name, i)


def test_stats_exports_work_on_plain_engines(store, demo_engine):
    for e in (demo_engine, dsjax.load(store, dtype="float32", in_memory=True)):
        e.generate("Thou", max_new_tokens=3)
        text = e.stats_prometheus()
        assert "dsjax_generated_tokens" in text and "dsjax_expert_activations{" in text
        assert '"requests"' in e.stats_json_line()


def test_stats_after_streaming(demo_engine):
    n = sum(1 for _ in demo_engine.stream(["Shall I", "Thou"], max_new_tokens=4, stop_token_ids=()))
    s = demo_engine.stats()
    assert s["batch"] == 2 and s["generated_tokens"] == n and s["ttft_s"] > 0
