"""Packaging: `kernels/` imports as `dsjax_kernels` from an editable and from a normal install, never as `kernels`
(Hugging Face's `kernels` package owns that name and transformers probes for it)."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import importlib.util, dsjax, dsjax_kernels, dsjax.model, dsjax.quant, dsjax.store, dsjax.runtime;"
         "print(dsjax_kernels.__file__); print(importlib.util.find_spec('kernels') is None)")


def _probe(cwd, env=None):
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, no_kernels = out.stdout.split()
    return path, no_kernels == "True"


def test_installed_package_imports_dsjax_kernels(tmp_path):
    """The environment running the tests (make test: an editable install) maps kernels/ to dsjax_kernels."""
    path, no_kernels = _probe(tmp_path)
    assert os.path.samefile(os.path.dirname(path), os.path.join(REPO, "kernels"))
    assert no_kernels, "a top-level `kernels` module is importable: it would shadow Hugging Face's package"


def test_normal_install_imports_dsjax_kernels(tmp_path):
    pytest.importorskip("setuptools")
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), REPO], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # A quiet install: setuptools used to print ~50 lines ("Package 'dsjax.data' ... would be ignored").
    assert "Warning" not in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    assert (target / "dsjax_kernels" / "__init__.py").exists() and not (target / "kernels").exists()
    assert (target / "dsjax_configs" / "balanced.yaml").exists()        # presets ship with the package
    assert (target / "dsjax" / "data" / "shakespeare-v3-tiny" / "model.safetensors").exists()    # the demo's model
    env = dict(os.environ, PYTHONPATH=str(target))
    path, no_kernels = _probe(tmp_path, env)
    assert path.startswith(str(target)), path
    assert no_kernels
