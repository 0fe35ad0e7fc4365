"""The standalone notebook runs top to bottom on a tiny model - documentation must not rot. The
study notebooks (01-06) read the demo's folder: tests/test_demo_smoke.py runs them on its smoke
demo."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("00_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("MECHINTERP_NOTEBOOK_MODEL", "tiny-random-llama")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


def test_notebooks_exist():
    assert NOTEBOOKS and os.path.getsize(NOTEBOOKS[0]) > 0


def test_progress_bars_show_in_a_jupyter_kernel(monkeypatch):
    """stderr is no tty in a kernel: bars used to be silent there. Now they are on, and drawn as
    a widget (rich's Jupyter live display)."""
    monkeypatch.delenv("MECHINTERP_PROGRESS", raising=False)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from mechinterp.progress import enabled, task\n"
        "print('enabled', enabled())\n"
        "with task('work', 3) as advance:\n"
        "    for _ in range(3):\n"
        "        advance()")]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    outs = nb.cells[0]["outputs"]
    assert not any(o.get("output_type") == "error" for o in outs)
    assert any("enabled True" in o.get("text", "") for o in outs)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outs)
