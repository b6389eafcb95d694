"""Test set-up: markers with automatic skips that say why, and shared fixtures."""

import os
import shutil
import tempfile

import pytest

# Tests run on the CPU unless a GPU test asks for the accelerator; keep XLA from grabbing all host cores' memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The persistent compilation cache `import dsjax` turns on goes to a directory of this run, not ~/.cache/dsjax/xla:
# the suite writes ~460 entries (18 MB) and every code change keys new ones, so a persistent directory would grow run
# after run (JAX never evicts by default) on CI and on developers' machines, and a test's compiles would depend on
# what earlier runs left there. The cache stays on, as users get it, and subprocesses (CLI, notebooks)
# inherit the directory. A DSJAX_COMPILE_CACHE set by the developer wins (e.g. a fixed one to reuse across runs);
# `make test` (tests/run_parts.sh) sets one directory for its parallel pytest processes, removed when they end.
_COMPILE_CACHE = None
if "DSJAX_COMPILE_CACHE" not in os.environ:
    _COMPILE_CACHE = tempfile.mkdtemp(prefix="dsjax-test-xla-")
    os.environ["DSJAX_COMPILE_CACHE"] = _COMPILE_CACHE


def pytest_unconfigure(config):
    if _COMPILE_CACHE is not None:
        shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


def _has_gpu() -> bool:
    import jax
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("gpu") for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: jax.devices() has none (run on the GPU machine)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """The embedded demo checkpoint (tiny V3 architecture, random weights, BPE tokenizer, chat template)."""
    from dsjax.demo import write_demo_checkpoint
    return write_demo_checkpoint(str(tmp_path_factory.mktemp("demo") / "ckpt"))


@pytest.fixture(scope="session")
def demo_engine(demo_checkpoint):
    import dsjax
    return dsjax.load(demo_checkpoint, dtype="float32")


@pytest.fixture(scope="session")
def store(demo_checkpoint, tmp_path_factory):
    """The demo checkpoint converted to an NVFP4 store (policy mlp); tests that damage a store copy it first."""
    from dsjax.store.writer import convert
    dst = str(tmp_path_factory.mktemp("store") / "demo-nvfp4")
    convert(demo_checkpoint, dst, fmt="nvfp4", policy="mlp", progress=False)
    return dst
