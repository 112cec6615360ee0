"""docs/tutorial.ipynb, the executed tutorial (tools/make_tutorial.py builds it from docs/tutorial.py).

The notebook built from the source runs top to bottom on a fresh python3 kernel, each cell within its
timeout (on MNIST when VAE_DATA_ROOT holds it, else on data=synthetic); the committed notebook holds
the source's cells, an output under every code cell and no error, in under 2 MB, so it reads on a code
host without running. The executed copy goes to tmp_path: the committed notebook is never rewritten."""
from __future__ import annotations

import nbformat

from tools.make_tutorial import NOTEBOOK, SOURCE, execute, notebook_from_percent

CELL_TIMEOUT = 300  # seconds per cell; the whole notebook takes about a minute and a half on 2 cores
MAX_BYTES = 2_000_000


def cells(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def missing_outputs(notebook: nbformat.NotebookNode) -> list[str]:
    """The first line of every code cell that shows nothing, or an error."""
    return [cell.source.splitlines()[0] for cell in notebook.cells if cell.cell_type == "code"
            and (not cell.outputs or any(output.output_type == "error" for output in cell.outputs))]


def test_the_committed_notebook_is_its_source_executed():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert cells(committed) == cells(notebook_from_percent(SOURCE.read_text())), (
        "docs/tutorial.ipynb is not docs/tutorial.py's: rebuild it with `python tools/make_tutorial.py`")
    assert not missing_outputs(committed), f"cells without outputs, or failed: {missing_outputs(committed)}"
    assert any("image/png" in output.get("data", {}) for cell in committed.cells for output in cell.get("outputs", []))
    assert NOTEBOOK.stat().st_size < MAX_BYTES, f"{NOTEBOOK.stat().st_size} bytes"


def test_the_tutorial_runs_top_to_bottom(tmp_path):
    notebook = notebook_from_percent(SOURCE.read_text())
    try:
        execute(notebook, cell_timeout=CELL_TIMEOUT)  # a failing cell raises CellExecutionError, its traceback
    finally:
        nbformat.write(notebook, tmp_path / "tutorial.ipynb")  # what ran, for a look after a failure
    assert not missing_outputs(notebook), missing_outputs(notebook)
