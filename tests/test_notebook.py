"""The quickstart notebook runs (at :tiny size) and stays paired with its jupytext script."""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def test_notebook_matches_its_script_and_has_no_outputs():
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(NOTEBOOKS / "quickstart.ipynb")
    script = jupytext.read(NOTEBOOKS / "quickstart.py")
    assert [c.source for c in nb.cells] == [c.source for c in script.cells]
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_quickstart_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel (started with this environment) compiles XLA's cheaper way, as `fast_compiles`
    # does in this process: the run checks that the notebook works, not its numbers.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "poisoned" in text and "final test acc" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
