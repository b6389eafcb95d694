"""The notebooks run top to bottom on the CPU with the embedded model (what a user opening them gets), and are
committed without outputs."""

import glob
import os
import shutil

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "*.ipynb")))


def _execute(path, tmp_path):
    """The notebook run top to bottom in a Jupyter kernel; returns it with its outputs (errors fail the test)."""
    nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra (nbformat, nbclient)")
    nbclient = pytest.importorskip("nbclient", reason="notebook tests need the dev extra (nbformat, nbclient)")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.delenv("DSJAX_STORE", raising=False)
    _execute(path, tmp_path)


def test_quickstart_runs_on_a_store_without_a_tokenizer(store, tmp_path, monkeypatch):
    """DSJAX_STORE may name any store. One without a tokenizer (bench/make_v3_slice.py writes such) takes and gives
    token ids: on the H200 the quickstart stopped at its first text prompt on the V3 slice."""
    bare = tmp_path / "bare-store"
    shutil.copytree(store, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink(missing_ok=True)
    monkeypatch.setenv("DSJAX_STORE", str(bare))
    nb = _execute(next(p for p in NOTEBOOKS if p.endswith("01_quickstart.ipynb")), tmp_path)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "token ids [" in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stale, f"{os.path.basename(path)}: cells {stale} carry outputs; clear them before committing"
