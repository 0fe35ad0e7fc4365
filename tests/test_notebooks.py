"""Notebooks run top to bottom (on a tiny model) - they are documentation that must not rot."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("MECHINTERP_NOTEBOOK_MODEL", "tiny-random-llama")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


def test_notebooks_exist():
    assert NOTEBOOKS and os.path.getsize(NOTEBOOKS[0]) > 0
