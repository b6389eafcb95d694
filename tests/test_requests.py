"""The request-level engine (issue 19): per-request randomness, continuous batching with chunked prefill, the KV pool
under the budget, one engine thread serving several caller threads, cancellation and failed steps.

Oracles: the same request run alone (greedy and seeded sampling), the engine's own full forward, the sequential
results of the threaded calls, the MemoryManager's ledger for the budget.
"""

import collections
import os
import shutil
import threading
import time

import numpy as np
import pytest

import dsjax
from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
from dsjax.runtime.requests import Request, RequestHandle
from dsjax.runtime.sampling import SamplingParams
from dsjax.runtime.scheduler import Scheduler
from dsjax.runtime.tiered import model_bytes_from_store
from dsjax.store.manifest import StoreCorruptError
from dsjax.store.reader import Store


def _prompts(n, seed=0, vocab=480):
    rng = np.random.default_rng(seed)
    # no fixed first token: padding (token 0) written at a real position would then go unnoticed
    return [rng.integers(2, vocab, int(rng.integers(2, 40))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tight(store):
    """Budgets that leave one GPU layer slot, a few expert slots and a small host cache: every tier works and the
    disk is read during generation (no preload)."""
    mb = model_bytes_from_store(Store(store), "float32")
    g = minimum_gpu_memory(mb, context_tokens=512, max_gpu_layers=1, prefetch_layers=1)
    return dict(gpu_memory=g, host_memory=2 * minimum_host_memory(mb), max_gpu_layers=1, prefetch_layers=1,
                preload_experts=False)


# ---- the Scheduler alone (plain bookkeeping) --------------------------------------------------------------------

class _Pages:
    """The KV pool's page accounting, without arrays."""

    page_tokens = 8

    def __init__(self, pages):
        self.free_pages = pages

    def alloc(self, n_tokens):
        n = -(-n_tokens // self.page_tokens)
        if n > self.free_pages:
            return None
        self.free_pages -= n
        return list(range(n))


def _req(prompt_len, budget, pos=0, generated=()):
    r = Request(RequestHandle("r", [0] * prompt_len, 0), [0] * prompt_len, SamplingParams(), 0, budget,
                frozenset())
    r.pos, r.generated = pos, list(generated)
    return r


def test_scheduler_admits_in_order_while_pages_last_and_chunks_prompts_within_the_token_budget():
    sched = Scheduler(max_running=3, step_tokens=10)                 # chunks of 10, one per step
    decoding = _req(4, 8, pos=5, generated=[1])                 # past its prompt: decodes one token
    waiting = collections.deque([_req(25, 8), _req(3, 4), _req(2, 2), _req(2, 2)])
    pages = _Pages(6)                                            # 48 tokens: room for the first two waiting requests
    plan = sched.next_step([decoding], waiting, pages)
    assert [len(r.prompt) for r in plan.admitted] == [25, 3]     # 25+8-1 = 32 tokens = 4 pages, 3+4-1 = 6 -> 1 page
    assert pages.free_pages == 1 and len(waiting) == 2           # max_running reached: the rest wait, in order
    assert plan.decode == [decoding]
    assert [(c.start, c.length) for c in plan.prefill] == [(0, 10)]       # the budget: one chunk, first come first
    # a budget of several chunks prefills several joining requests in one step, each at most a chunk long
    wide = Scheduler(max_running=8, step_tokens=512)
    plan = wide.next_step([_req(4, 8, pos=5, generated=[1])], collections.deque([_req(300, 8), _req(40, 4),
                                                                                 _req(3, 2)]), _Pages(100))
    assert wide.chunk_tokens == 256 and [(c.start, c.length) for c in plan.prefill] == [(0, 256), (0, 40)]
    # with nobody decoding, whole prompts go at once
    plan = Scheduler(max_running=4, step_tokens=10).next_step([], collections.deque([_req(25, 8), _req(3, 4)]),
                                                               _Pages(100))
    assert [(c.start, c.length, c.completes_prompt) for c in plan.prefill] == [(0, 25, True), (0, 3, True)]


def test_the_default_budget_starts_a_burst_of_31_prompts_beside_a_decoding_one_in_two_steps():
    # the server's ramp (bench/RESULTS.md run 11): 31 prompts of up to 256 tokens waiting while one request decodes
    from dsjax.runtime.config import MemoryConfig
    from dsjax.runtime.scheduler import DEFAULT_STEP_TOKENS
    assert MemoryConfig().step_tokens == DEFAULT_STEP_TOKENS       # the config and Engine's keyword share it
    sched = Scheduler(max_running=32, step_tokens=MemoryConfig().step_tokens)
    running = [_req(4, 8, pos=5, generated=[1])]
    waiting = collections.deque(_req(32 + 7 * k, 64) for k in range(31))
    steps = 0
    while waiting or any(r.prefilling for r in running):
        plan = sched.next_step(running, waiting, _Pages(10_000))
        running += plan.admitted
        assert plan.decode == [r for r in running if not r.prefilling]   # nobody decoding is held back
        for c in plan.prefill:
            c.request.pos += c.length
        steps += 1
    assert steps == 2 and len(running) == 32                     # 16 chunks a step (1,024 tokens: 4, ~8 steps)


def test_scheduler_head_of_line_waits_for_pages():
    sched = Scheduler(max_running=8, step_tokens=64)
    waiting = collections.deque([_req(60, 10), _req(2, 2)])
    plan = sched.next_step([], waiting, _Pages(4))               # the first needs 9 pages of 8 tokens: it waits
    assert plan.admitted == [] and plan.empty and len(waiting) == 2


# ---- per-request randomness and continuous batching --------------------------------------------------------------

def test_a_seeded_request_samples_the_same_alone_in_a_batch_and_joining(demo_engine):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50)
    prompt = "Sometime too hot the eye"
    alone = demo_engine.generate(prompt, seed=7, **kw)
    batch = demo_engine.generate(["By chance", prompt, "Rough winds do shake"], seed=[1, 7, 2], **kw)
    assert batch[1].token_ids == alone.token_ids and batch[1].seed == 7
    assert batch[0].token_ids != batch[1].token_ids
    # joining a running batch: a long request is decoding when the seeded one arrives
    long = demo_engine.submit("Shall I compare thee", max_new_tokens=40, temperature=1.0, seed=3)
    next(long.events())                                             # it has started decoding
    joined = demo_engine.submit(prompt, seed=7, **kw)
    assert joined.result().token_ids == alone.token_ids
    assert long.result().token_ids == demo_engine.generate("Shall I compare thee", max_new_tokens=40,
                                                           temperature=1.0, seed=3).token_ids


def test_seed_none_draws_a_fresh_seed_and_reports_it(demo_engine):
    a, b = demo_engine.generate(["Thou art", "Thou art"], max_new_tokens=8, temperature=1.0, seed=None)
    assert a.seed != b.seed
    again = demo_engine.generate("Thou art", max_new_tokens=8, temperature=1.0, seed=a.seed)
    assert again.token_ids == a.token_ids
    with pytest.raises(ValueError, match="one per prompt"):
        demo_engine.generate(["a", "b"], seed=[1])


def test_forty_prompts_of_mixed_lengths_each_equal_their_single_prompt_result(demo_engine):
    prompts = _prompts(40, seed=1)
    together = demo_engine.generate(prompts, max_new_tokens=6, stop_token_ids=())
    assert len(together) == 40 and demo_engine.stats()["steps"]["max_running"] <= 32
    for p, g in zip(prompts, together):
        assert g.token_ids == demo_engine.generate(p, max_new_tokens=6, stop_token_ids=()).token_ids, p


def test_a_prompt_joining_mid_run_is_prefilled_in_chunks_beside_the_decoding_rows(store):
    e = dsjax.load(store, dtype="float32", step_tokens=8)
    long_prompt = _prompts(1, seed=4)[0] + list(range(100, 130))        # > 8 tokens: several chunks
    alone = e.generate(long_prompt, max_new_tokens=5, stop_token_ids=()).token_ids
    runner_alone = e.generate([0, 5, 6], max_new_tokens=30, stop_token_ids=()).token_ids
    before = e.stats()["steps"]
    runner = e.submit([0, 5, 6], max_new_tokens=30, stop_token_ids=())
    it = runner.events()
    next(it)
    joined = e.submit(long_prompt, max_new_tokens=5, stop_token_ids=())
    assert joined.result().token_ids == alone
    assert runner.result().token_ids == runner_alone
    after = e.stats()["steps"]
    # the joining prompt went in chunks of at most 8 tokens while the runner decoded
    assert after["prefill_tokens"] - before["prefill_tokens"] == 3 + len(long_prompt)
    assert after["steps"] - before["steps"] < 30 + 5 + 1            # shared steps, not one after the other
    assert e.stats()["expert_activations"] and sum(map(sum, e.stats()["expert_activations"])) > 0


def test_too_long_prompts_and_oversized_requests_are_refused_naming_the_lengths(demo_engine):
    limit = demo_engine.max_context
    with pytest.raises(ValueError, match=f"has {limit} tokens; the context limit is {limit}"):
        demo_engine.submit([1] * limit)
    with pytest.raises(ValueError, match="a prompt is text, a list of token ids"):
        demo_engine.generate(["text", 1, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty input"):
        demo_engine.logits([])
    with pytest.raises(ValueError, match="empty input"):
        demo_engine.logits([[]])
    with pytest.raises(ValueError, match="top_k=100000 must be <= the vocabulary size"):
        demo_engine.generate("a", top_k=100_000, temperature=1.0)


# ---- the KV pool under the budget -------------------------------------------------------------------------------

def test_more_requests_than_the_kv_pool_holds_queue_and_complete_within_the_budget(store, tight):
    e = dsjax.load(store, dtype="float32", **tight)
    pool = e.kv
    need = -(-(30 + 40 - 1) // pool.page_tokens)                    # pages of one request below
    prompts = [[0] + list(range(10 + i, 39 + i)) for i in range(pool.pages // need + 3)]   # 30-token prompts
    assert len(prompts) * need > pool.pages                         # they cannot all run at once
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(e.requests_status())
            time.sleep(0.002)
    w = threading.Thread(target=watch)
    w.start()
    try:
        got = e.generate(prompts, max_new_tokens=40, stop_token_ids=())
    finally:
        stop.set()
        w.join()
    assert all(len(g.token_ids) == 40 or g.finish_reason == "stop" for g in got)
    assert max(s["kv"]["pages_used"] for s in seen) <= pool.pages
    assert any(s["waiting"] > 0 for s in seen)                      # some requests waited for pages
    assert e.stats()["steps"]["max_running"] <= pool.pages // need
    compute = e.stats()["pools"]["compute"]
    assert 0 < compute["used"] <= compute["capacity"]               # the pool is in the ledger, within the budget
    single = e.generate(prompts[-1], max_new_tokens=40, stop_token_ids=())
    assert got[-1].token_ids == single.token_ids


# ---- one engine thread, many callers ----------------------------------------------------------------------------

def test_four_threads_calling_generate_on_one_engine_get_the_sequential_results(store, tight):
    e = dsjax.load(store, dtype="float32", **tight)
    work = {t: [_prompts(2, seed=10 * t + r) for r in range(3)] for t in range(4)}
    kw = dict(max_new_tokens=6, temperature=0.8, seed=5, stop_token_ids=())
    sequential = {t: [[g.token_ids for g in e.generate(p, **kw)] for p in rounds] for t, rounds in work.items()}
    assert e.stats()["links"]["disk->host"]["bytes"] > 0             # the budget forces disk reads
    got, errors = {}, []

    def caller(t):
        try:
            got[t] = [[g.token_ids for g in e.generate(p, **kw)] for p in work[t]]
        except Exception as exc:                                     # reported below with the thread's id
            errors.append((t, exc))
    threads = [threading.Thread(target=caller, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert got == sequential
    assert e.stats()["steps"]["max_running"] > 2                     # the callers' requests ran together
    assert [g.token_ids for g in e.generate(work[0][0], **kw)] == sequential[0][0]     # and it still works


def test_cancel_frees_the_request_at_the_next_step(demo_engine):
    h = demo_engine.submit("Thou art more", max_new_tokens=200, temperature=1.0, seed=1, stop_token_ids=())
    other = demo_engine.submit("Shall I", max_new_tokens=10, stop_token_ids=())
    events = h.events()
    next(events)
    h.cancel()
    rest = list(events)
    assert rest and rest[-1].finished and rest[-1].finish_reason == "cancelled"
    assert h.result().finish_reason == "cancelled" and len(h.result().token_ids) < 200
    assert other.result().token_ids == demo_engine.generate("Shall I", max_new_tokens=10,
                                                            stop_token_ids=()).token_ids
    deadline = time.time() + 5
    while demo_engine.requests_status()["running"] and time.time() < deadline:
        time.sleep(0.01)
    s = demo_engine.requests_status()
    assert s["running"] == 0 and s["kv"]["pages_used"] == 0 and s["finished"]["cancelled"] >= 1


def test_a_failed_step_fails_its_requests_and_the_engine_keeps_serving(store, tight, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(store, bad)
    shard = next(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(bad, "experts", "layer_002", "up"))
                 for f in sorted(fs) if not f.endswith(".json"))
    data = bytearray(open(shard, "rb").read())
    data[100] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    e = dsjax.load(bad, dtype="float32", **tight)
    for _ in range(2):                 # the same clear error each time, never a broken cache ("slots are pinned")
        with pytest.raises(StoreCorruptError, match="experts_up"):
            e.generate(_prompts(3, seed=2), max_new_tokens=3)
        assert e.requests_status()["running"] == 0 and e.requests_status()["kv"]["pages_used"] == 0
    logits = e.logits([[0, 5, 6]])                     # dense layer 0 and layer 1's experts work
    assert np.isfinite(logits).all()
    assert e.requests_status()["finished"]["error"] >= 6


def test_logprobs_are_the_models_log_softmax(demo_engine):
    g = demo_engine.generate("Shall I compare", max_new_tokens=4, logprobs=3, stop_token_ids=())
    seq = list(g.prompt_ids)
    for tok, (lp, top) in zip(g.token_ids, g.logprobs):
        logits = demo_engine.logits([seq])[0, -1].astype(np.float64)
        ref = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        assert abs(lp - ref[tok]) < 1e-4
        assert [t for t, _ in top] == list(np.argsort(-ref)[:3])
        assert top[0][0] == tok                                     # greedy: the most likely token
        seq.append(tok)


def test_an_engine_dropped_without_close_is_collected_and_its_thread_ends(demo_checkpoint):
    """The engine thread holds its engine only weakly while idle: a caller that drops an engine frees its device
    arrays (a test suite that builds dozens of engines would otherwise keep them all)."""
    import gc
    import weakref
    e = dsjax.load(demo_checkpoint, dtype="float32")
    e.generate("Thou", max_new_tokens=2)
    ref, thread = weakref.ref(e), e._thread
    del e
    deadline = time.time() + 10
    while (ref() is not None or thread.is_alive()) and time.time() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert ref() is None and not thread.is_alive()
