"""`dsjax serve`: a real uvicorn server on a loopback port over the demo store, spoken to through OpenAI's own Python
client (and urllib where a client would refuse to send the request: malformed JSON, NaN).

One server for the module. The engine is loaded with max_batch_size=16 and dynamic_batch off so that every decode
step has one shape (16 rows): CPU compile time, not the checks, would otherwise dominate this file.
"""

import json
import math
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from dsjax.serve.text import ReasoningSplitter, StopFilter  # noqa: E402

MODEL = "demo"
KEY = "test-key"
PROMPTS = ["Shall I compare", "Thou art more", "Rough winds do", "And summer's lease", "Sometime too hot",
           "And often is", "And every fair", "By chance or", "But thy eternal", "Nor lose possession",
           "Nor shall death", "When in eternal", "So long as", "So long lives", "Shall I", "Thou art"]


def _serve(app):
    """A uvicorn server of `app` on a free loopback port, started on a thread: (url, stop())."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)

    def stop():
        srv.should_exit = True
        thread.join(timeout=30)
    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def server(store):
    import dsjax
    from dsjax.serve import create_app
    engine = dsjax.load(store, dtype="float32", max_batch_size=16, dynamic_batch=False)
    app = create_app(engine, served_model_name=MODEL, api_key=KEY, max_queue=64, request_timeout=120)
    url, stop = _serve(app)
    yield SimpleNamespace(url=url, engine=engine, state=app.state.server,
                          client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120))
    stop()
    engine.close()


def raw(server, path, body: bytes | None = None, key=KEY):
    """(status, headers, parsed JSON or text) of a request sent byte for byte."""
    req = urllib.request.Request(server.url + path, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, headers, text = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, text = e.code, e.headers, e.read().decode()
    try:
        return status, headers, json.loads(text)
    except json.JSONDecodeError:
        return status, headers, text


def complete(server, prompt, **kw):
    kw.setdefault("max_tokens", 4)
    kw.setdefault("temperature", 0.0)
    return server.client.completions.create(model=MODEL, prompt=prompt, extra_body={"return_token_ids": True}, **kw)


def ids(choice):
    return choice.model_extra["token_ids"]


# ---- the API ---------------------------------------------------------------------------------------------------
def test_completions_and_chat(server):
    c = server.client
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert raw(server, "/health", key=None)[0] == 200

    r = complete(server, PROMPTS[0])
    ch = r.choices[0]
    assert ch.finish_reason in ("stop", "length") and 1 <= len(ids(ch)) <= 4
    assert ch.text == server.engine.tokenizer.decode(ids(ch))
    assert r.usage.prompt_tokens == len(server.engine.encode(PROMPTS[0]))
    assert r.usage.completion_tokens == len(ids(ch)) and r.usage.total_tokens == r.usage.prompt_tokens + len(ids(ch))

    msgs = [{"role": "user", "content": "Speak, what news?"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    m = r.choices[0].message
    assert m.role == "assistant" and isinstance(m.content, str)
    assert r.usage.prompt_tokens == len(server.engine.encode(msgs, chat=True))

    # streamed: one chunk per token, the role first, then the usage chunk with no choices; same text as unstreamed
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    tokens = chunks[1:-1]
    assert len(tokens) == r.usage.completion_tokens
    assert "".join(t.choices[0].delta.content or "" for t in tokens) == m.content
    assert tokens[-1].choices[0].finish_reason == r.choices[0].finish_reason

    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, stream=True))
    assert "".join(k.choices[0].text for k in chunks) == ch.text and len(chunks) == len(ids(ch))


def test_logprobs(server):
    r = complete(server, PROMPTS[1], logprobs=2)
    lp = r.choices[0].logprobs
    n = len(ids(r.choices[0]))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert tok_lp <= 0 and 1 <= len(top) <= 2
        assert math.isclose(tok_lp, max(top.values()), rel_tol=1e-5)      # greedy: the sampled token is the top one
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    r = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hark"}],
                                              max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)


def test_echo_logprobs_score_the_prompt(server):
    """lm-eval's loglikelihood request: echo + logprobs over a token-id prompt; each prompt token's logprob given the
    tokens before it, checked against a log-softmax of the engine's full-forward logits."""
    import numpy as np
    prompt = server.engine.encode(PROMPTS[8])
    r = server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1,
                                         echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    x = server.engine.logits(prompt)[0].astype(np.float64)
    ref = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    want = [ref[t - 1, prompt[t]] for t in range(1, len(prompt))]
    np.testing.assert_allclose(lp.token_logprobs[1:len(prompt)], want, rtol=1e-4, atol=1e-5)
    assert lp.text_offset == sorted(lp.text_offset)
    assert r.choices[0].text.startswith(server.engine.tokenizer.decode(prompt))
    greedy = complete(server, prompt, max_tokens=1)
    assert r.choices[0].text == server.engine.tokenizer.decode(prompt) + greedy.choices[0].text

    r = server.client.completions.create(model=MODEL, prompt=PROMPTS[8], max_tokens=0, echo=True)
    assert r.choices[0].text == PROMPTS[8] and r.usage.completion_tokens == 0
    assert raw(server, "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode())[0] == 400


def test_stop_strings(server):
    full = complete(server, PROMPTS[2], max_tokens=8).choices[0].text
    if len(full.strip()) < 4:
        pytest.skip(f"the greedy continuation {full!r} is too short to cut")
    k = len(full) // 2
    stop = full[k:k + 2]
    want = full[:full.index(stop)]
    r = complete(server, PROMPTS[2], max_tokens=8, stop=[stop, "no such string"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(server.client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=0,
                                                   stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_under_concurrency(server):
    def sample(prompt, seed, **kw):
        return complete(server, prompt, temperature=1.0, top_p=0.95, seed=seed, max_tokens=6, **kw)

    alone = [ids(sample(PROMPTS[3], 7).choices[0]), ids(sample(PROMPTS[3], 8).choices[0])]
    with ThreadPoolExecutor(6) as pool:        # the same requests beside others, then as n=2 (seeds 7 and 8)
        others = [pool.submit(sample, PROMPTS[4 + i], 100 + i) for i in range(4)]
        mine = pool.submit(sample, PROMPTS[3], 7)
        both = pool.submit(sample, PROMPTS[3], 7, n=2)
        [f.result() for f in others]
        assert ids(mine.result().choices[0]) == alone[0]
        assert [ids(c) for c in sorted(both.result().choices, key=lambda c: c.index)] == alone


def test_concurrent_greedy_equals_sequential(server):
    one_by_one = [complete(server, p) for p in PROMPTS]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: complete(server, p), PROMPTS))
    assert [ids(r.choices[0]) for r in together] == [ids(r.choices[0]) for r in one_by_one]
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in one_by_one]


def test_disconnect_cancels_the_request(server):
    before = server.engine.requests_status()["finished"].get("cancelled", 0)
    stream = server.client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=200, temperature=0,
                                              stream=True)
    it = iter(stream)
    next(it), next(it)
    assert server.engine.requests_status()["running"] == 1
    stream.close()                                     # the client goes away after two tokens of 200
    deadline = time.monotonic() + 20
    while True:
        st = server.engine.requests_status()
        if st["running"] == 0 and st["finished"].get("cancelled", 0) == before + 1:
            break
        assert time.monotonic() < deadline, f"the disconnected request is still held: {st}"
        time.sleep(0.05)
    status, _, text = raw(server, "/metrics")
    assert status == 200 and "dsjax_serve_requests_running 0" in text
    assert 'dsjax_serve_requests_finished_total{reason="cancelled"}' in text
    assert server.state.pending == 0


def test_queue_bound_answers_429(server):
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[6], "max_tokens": 2}).encode()
    server.state.max_queue = 0                     # nothing may wait: deterministic refusal
    try:
        status, headers, err = raw(server, "/v1/completions", body)
        assert status == 429 and headers["Retry-After"] and err["error"]["type"] == "rate_limit_error"
        server.state.max_queue = 2                 # a burst of 8: the first two are taken, the rest refused
        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(s for s, _, _ in pool.map(lambda _: raw(server, "/v1/completions", body), range(8)))
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    finally:
        server.state.max_queue = 64
    assert raw(server, "/v1/completions", body)[0] == 200


BAD = [
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ('{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": [5] * 600}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "top_k": 10**6}, 400, "top_k"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ('{"prompt": "x", "max_tokens": 4', 400, None),
    ({"max_tokens": 4}, 400, "prompt"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[
    "negative_max_tokens", "negative_temperature", "nan_temperature", "top_p_0", "top_p_above_1", "prompt_too_long",
    "max_tokens_past_context", "top_k_past_vocab", "n_0", "unknown_model", "malformed_json", "no_prompt"])
def test_bad_requests_name_the_field(server, body, status, param):
    data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    got, _, err = raw(server, "/v1/completions", data)
    assert got == status, err
    e = err["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["param"] == param and e["message"]
    if param:
        assert param in e["message"]
    if param == "prompt" and isinstance(body, dict) and "prompt" in body:
        assert "600" in e["message"] and str(server.engine.max_context) in e["message"]   # both lengths


CHAT_MSG = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": CHAT_MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": CHAT_MSG, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": CHAT_MSG, "stop": ["ok", ""]}, "stop"),
], ids=["no_messages", "unknown_role", "max_completion_tokens_0", "top_logprobs_50", "empty_stop"])
def test_bad_chat_requests_name_the_field(server, body, param):
    got, _, err = raw(server, "/v1/chat/completions", json.dumps(body).encode())
    assert got == 400 and err["error"]["param"] == param and param in err["error"]["message"], err


def test_errors_through_the_openai_client_and_the_server_keeps_serving(server):
    with pytest.raises(openai.BadRequestError) as e:
        complete(server, "x", max_tokens=-1)
    assert e.value.status_code == 400 and "max_tokens" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="nope", prompt="x")
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert e.value.status_code == 401
    assert raw(server, "/v1/models", key=None)[0] == 401
    assert complete(server, "x", seed=-1, temperature=1.0).choices[0].finish_reason    # any int64 seed is taken
    assert complete(server, PROMPTS[0]).choices[0].finish_reason in ("stop", "length")
    assert server.state.pending == 0


def test_metrics(server):
    complete(server, PROMPTS[7])
    deadline = time.monotonic() + 10
    while True:            # the engine publishes its running count after the step that sent the last token
        status, headers, text = raw(server, "/metrics", key=None)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                  if line and not line.startswith("#")}
        if values["dsjax_serve_requests_running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert values["dsjax_serve_time_to_first_token_seconds_count"] >= 1
    assert values["dsjax_serve_inter_token_latency_seconds_count"] >= 1
    assert values["dsjax_serve_generation_tokens_total"] >= 1 and values["dsjax_serve_prompt_tokens_total"] >= 1
    assert values["dsjax_serve_requests_running"] == 0 and "dsjax_serve_kv_usage_ratio" in values
    assert values["dsjax_serve_steps_total"] >= 1
    assert any(k.startswith("dsjax_") and not k.startswith("dsjax_serve_") for k in values)   # the runtime's own


def test_cli_has_serve():
    from dsjax.cli import build_parser
    a = build_parser().parse_args(["serve", "--port", "9", "--max-queue", "3", "--set", "max_batch_size=8"])
    assert (a.path, a.port, a.max_queue, a.set) == (None, 9, 3, ["max_batch_size=8"])
    assert (a.warmup_prompt, a.warmup_tokens, a.warmup_bursts) == (None, 256, 1)   # None: 512 on a GPU, 0 on a CPU
    a = build_parser().parse_args(["serve", "--warmup-prompt", "0", "--warmup-tokens", "64", "--warmup-bursts", "8"])
    assert (a.warmup_prompt, a.warmup_tokens, a.warmup_bursts) == (0, 64, 8)


def test_serve_refuses_a_bad_warmup_length_before_loading(capsys, tmp_path):
    from dsjax.cli import main
    # the path does not exist: the refusal comes before anything is loaded
    assert main(["serve", str(tmp_path / "absent"), "--warmup-tokens", "0"]) == 2
    assert "--warmup-tokens 0 must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "absent"), "--warmup-bursts", "0"]) == 2
    assert "--warmup-bursts 0 must be >= 1" in capsys.readouterr().err


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(capsys, tmp_path):
    """A port out of range, a host that does not resolve, a port another process listens on: refused in a second
    with the fix, before the model loads (the path does not exist, so a load would fail with another message)."""
    import socket

    from dsjax.cli import main
    absent = str(tmp_path / "absent")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, msg in ((["--port", "70000"], "--port 70000 must lie in 0..65535"),
                          (["--host", "nosuchhost.invalid"], "--host 'nosuchhost.invalid' does not resolve"),
                          (["--port", str(port)], f"cannot listen on 127.0.0.1:{port} (Address already in use)")):
            assert main(["serve", absent, *args]) == 2
            assert msg in capsys.readouterr().err, args
    with socket.socket() as free:                   # and an address that is free passes the check (then the load fails)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    assert main(["serve", absent, "--port", str(port)]) == 2
    assert "no such" in capsys.readouterr().err


def test_serve_warmup_reports_progress_and_what_it_compiled(store, capsys):
    """The warm-up `dsjax serve` runs before answering prints its progress (shapes done of all, seconds, the time left
    at the rate so far) and a summary with the engine's own counts."""
    from dsjax.runtime.engine import Engine
    from dsjax.serve.cli import _warmup
    from dsjax.store.reader import Store
    st = Store(store)
    e = Engine(st.config, st.load_weights(np.float32, "device"), max_batch_size=1, max_context=40, step_tokens=64)
    try:
        shapes = len(e._warm_shapes(16, 2))
        _warmup(e, 16, 2)
    finally:
        e.close()
    err = capsys.readouterr().err
    assert f"warm-up: {shapes}/{shapes} step shapes compiled" in err       # the last progress line, with no time left
    assert f"warm-up done: prompts up to 16 tokens, outputs up to 2: {shapes} step shapes" in err


def test_a_warming_server_answers_503_with_its_progress_until_ready(server):
    """`dsjax serve` listens during its warm-up (dsjax.serve.readiness): /health 503 with the progress and
    Retry-After, the completion routes 503 (code warming_up), /v1/models and /metrics as usual; then 200 and the
    same tokens as a server that was never warming."""
    from dsjax.serve import create_app
    from dsjax.serve.readiness import Readiness
    r = Readiness()
    r.progress(3, 10)
    url, stop = _serve(create_app(server.engine, served_model_name=MODEL, api_key=KEY, readiness=r))
    try:
        warm = SimpleNamespace(url=url)
        status, headers, body = raw(warm, "/health")
        assert status == 503 and headers["Retry-After"] == "10" and body["status"] == "warming_up"
        assert (body["warmup"]["step_shapes_done"], body["warmup"]["step_shapes"], body["warmup"]["ready"]) == \
            (3, 10, False)
        req = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        for path, b in (("/v1/completions", req),
                        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]})):
            status, headers, body = raw(warm, path, json.dumps(b).encode())
            assert status == 503 and headers["Retry-After"] == "10", (path, body)
            assert body["error"]["code"] == "warming_up" and "3/10 step shapes" in body["error"]["message"]
        assert raw(warm, "/v1/models")[0] == 200
        text = raw(warm, "/metrics")[2]
        assert "dsjax_serve_ready 0" in text and "dsjax_serve_warmup_step_shapes_done 3" in text
        r.progress(10, 10)
        r.finish()
        status, _, body = raw(warm, "/health")
        assert status == 200 and body["status"] == "ok" and body["warmup"]["ready"] and body["warmup"]["error"] is None
        status, _, body = raw(warm, "/v1/completions", json.dumps({**req, "return_token_ids": True}).encode())
        assert status == 200 and body["choices"][0]["token_ids"] == ids(complete(server, PROMPTS[0]).choices[0])
        assert "dsjax_serve_ready 1" in raw(warm, "/metrics")[2]
    finally:
        stop()


def test_the_background_warmup_fills_readiness_stops_when_cancelled_and_reports_a_failure(store, capsys):
    """dsjax serve's warm-up thread: progress into the readiness, ready at the end; cancelled (shutdown) after the
    step shape under way, the engine serving afterwards; a warm-up that fails leaves the server ready with the error."""
    from dsjax.runtime.engine import Engine
    from dsjax.serve.cli import _warmup_in_background
    from dsjax.serve.readiness import Readiness
    from dsjax.store.reader import Store
    st = Store(store)
    e = Engine(st.config, st.load_weights(np.float32, "device"), max_batch_size=1, max_context=40, step_tokens=64)
    try:
        shapes = len(e._warm_shapes(16, 2))
        r = Readiness()
        _warmup_in_background(e, r, 16, 2, 1, None)
        assert r.ready and r.error is None and r.done == r.total == shapes
        r = Readiness()
        r.cancel()
        _warmup_in_background(e, r, 16, 2, 1, None)
        assert r.ready and r.error.startswith("cancelled") and r.done == 1 < shapes
        assert len(e.generate([[0, 5, 6]], max_new_tokens=3, stop_token_ids=())[0].token_ids) == 3   # serves on
        r = Readiness()
        _warmup_in_background(e, r, 16, 0, 1, None)                   # max_new_tokens 0: Engine.warmup refuses it
        assert r.ready and r.error.startswith("ValueError") and "max_new_tokens" in r.error
        assert "warm-up failed (ValueError" in capsys.readouterr().err
    finally:
        e.close()


# ---- the text filters, over every way of cutting a text into tokens ----------------------------------------------
def _pieces(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("seed", range(20))
def test_reasoning_split_and_stop_across_token_boundaries(seed):
    rng = random.Random(seed)
    text = "<think>weigh it < or > </th then</think>The answer <b>is</b> 4. END tail"
    s = ReasoningSplitter()
    out = [s.push(p) for p in _pieces(text, rng)] + [s.flush()]
    assert "".join(r for r, _ in out) == "weigh it < or > </th then"
    assert "".join(c for _, c in out) == "The answer <b>is</b> 4. END tail"
    s = ReasoningSplitter(thinking=True)               # R1's template opened the thought in the prompt
    out = [s.push(p) for p in _pieces("hmm</think>yes", rng)] + [s.flush()]
    assert ("".join(r for r, _ in out), "".join(c for _, c in out)) == ("hmm", "yes")

    f = StopFilter(["END", "nd"])
    got, stopped = [], False
    for p in _pieces(text, rng):
        t, stopped = f.push(p)
        got.append(t)
        if stopped:
            break
    assert stopped and "".join(got) == text[:text.index("END")]
