"""The persistent compilation cache `import dsjax` turns on (dsjax/compile_cache.py), seen from fresh processes as a
user meets it: the first process writes entries, the next loads them instead of compiling (JAX's monitoring events
'/jax/compilation_cache/cache_misses', recorded on each write, and '/jax/compilation_cache/cache_hits'), and both
generate the same tokens; `off` writes nothing; a cache the user configured for JAX is left alone."""

import json
import os
import subprocess
import sys

import pytest

from dsjax.compile_cache import MIN_COMPILE_SECS, default_cache_dir

# Loads a store tiered (experts stream: a GPU slot pool, the host cache, the disk) and generates a few tokens,
# counting the cache's events. JAX writes only compiles slower than a threshold: the env sets it to 0, so every
# compile is written and the second process must find every one (at dsjax's 0.1 s, one near the line could be
# written by either process, depending on the machine's load).
CHILD = r"""
import json, sys
import jax, jax.monitoring
events = {}
jax.monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
import dsjax
e = dsjax.load(sys.argv[1], dtype="float32", **json.loads(sys.argv[2]))
tokens = [g.token_ids for g in e.generate([[0, 17, 42, 99, 7], [0, 5, 6]], max_new_tokens=3, stop_token_ids=())]
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "tokens": tokens,
                  "writes": events.get("/jax/compilation_cache/cache_misses", 0),
                  "hits": events.get("/jax/compilation_cache/cache_hits", 0)}))
"""


@pytest.fixture(scope="module")
def tight(store):
    from dsjax.runtime.planner import minimum_gpu_memory, minimum_host_memory
    from dsjax.runtime.tiered import model_bytes_from_store
    from dsjax.store.reader import Store
    mb = model_bytes_from_store(Store(store))
    g = minimum_gpu_memory(mb, context_tokens=512, max_gpu_layers=1, prefetch_layers=1)
    return dict(gpu_memory=g, host_memory=2 * minimum_host_memory(mb), max_gpu_layers=1, prefetch_layers=1)


def _env(tmp_path, **set_vars) -> dict:
    """A user's environment without JAX cache settings, HOME and XDG_CACHE_HOME in tmp_path (so a default that
    ignored XDG_CACHE_HOME would still not touch the real ~/.cache), plus set_vars."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DSJAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE")}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(set_vars)
    os.makedirs(env["HOME"], exist_ok=True)
    return env


def _run(code: str, env: dict, *args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=env["HOME"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _generate(store, budget, env) -> dict:
    return json.loads(_run(CHILD, env, store, json.dumps(budget)).stdout.splitlines()[-1])


def _entries(path) -> list[str]:
    return sorted(f for _, _, files in os.walk(path) for f in files)


def test_second_process_loads_what_the_first_compiled(store, tight, tmp_path):
    default = tmp_path / "xdg" / "dsjax" / "xla"
    first = _generate(store, tight, _env(tmp_path))                               # the default directory
    assert first["dir"] == str(default)
    written = _entries(default)
    assert first["writes"] > 0 and first["hits"] == 0
    assert len([f for f in written if f.endswith("-cache")]) == first["writes"], written

    second = _generate(store, tight, _env(tmp_path, DSJAX_COMPILE_CACHE=str(default)))
    assert second["dir"] == str(default)
    assert second["hits"] == first["writes"] and second["writes"] == 0, (first, second)
    assert _entries(default) == written                                      # nothing new was compiled
    assert second["tokens"] == first["tokens"]


PROBE = ("import warnings; warnings.simplefilter('always'); import dsjax, jax; "
         "print(jax.config.jax_compilation_cache_dir)")
THRESHOLD = "; print(jax.config.jax_persistent_cache_min_compile_time_secs)"


def test_off_writes_nothing(store, tight, tmp_path):
    got = _generate(store, tight, _env(tmp_path, DSJAX_COMPILE_CACHE="off"))
    assert got["dir"] is None and got["writes"] == 0 and got["hits"] == 0, got
    assert _run(PROBE, _env(tmp_path, DSJAX_COMPILE_CACHE="0")).stdout.strip() == "None"
    assert _entries(tmp_path) == []                       # not even the default directory was created


def test_a_users_jax_cache_settings_win(tmp_path):
    env = _env(tmp_path, DSJAX_COMPILE_CACHE=str(tmp_path / "ours"))
    del env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]
    probe = lambda **kw: _run(PROBE + THRESHOLD, dict(env, **kw)).stdout.split()   # noqa: E731
    assert probe() == [str(tmp_path / "ours"), str(MIN_COMPILE_SECS)]               # dsjax's threshold
    assert probe(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="2.5") == [str(tmp_path / "ours"), "2.5"]
    assert probe(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "theirs")) == [str(tmp_path / "theirs"), "1.0"]
    assert probe(JAX_ENABLE_COMPILATION_CACHE="false") == ["None", "1.0"]


def test_an_unusable_directory_does_not_break_import(tmp_path):
    (tmp_path / "a_file").write_text("")
    r = _run(PROBE + "; print(jax.jit(lambda a: a + 1)(1))",
             _env(tmp_path, DSJAX_COMPILE_CACHE=str(tmp_path / "a_file" / "xla")))
    assert r.stdout.split() == ["None", "2"]
    assert r.stderr.count("no persistent compilation cache") == 1, r.stderr


def test_default_cache_dir():
    assert default_cache_dir({}) == os.path.join(os.path.expanduser("~"), ".cache", "dsjax", "xla")
    assert default_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/dsjax/xla"
    assert default_cache_dir({"XDG_CACHE_HOME": "/x", "DSJAX_COMPILE_CACHE": "/c"}) == "/c"
    assert default_cache_dir({"DSJAX_COMPILE_CACHE": " OFF "}) is None
    assert default_cache_dir({"DSJAX_COMPILE_CACHE": "0"}) is None
    assert default_cache_dir({"DSJAX_COMPILE_CACHE": ""}) == default_cache_dir({})
