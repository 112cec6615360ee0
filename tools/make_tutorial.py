"""Build docs/tutorial.ipynb from docs/tutorial.py and execute it: `python tools/make_tutorial.py`.

docs/tutorial.py is the notebook's source in jupytext's "percent" format: a line `# %%` starts a code
cell, `# %% [markdown]` a markdown cell whose lines are comments ("# " taken off). The notebook is
executed by nbclient on the python3 kernel with the project's root as its working directory, and
written with its outputs. `--no-execute` writes it without running it.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

PROJECT_DIR = Path(__file__).resolve().parents[1]
SOURCE, NOTEBOOK = PROJECT_DIR / "docs" / "tutorial.py", PROJECT_DIR / "docs" / "tutorial.ipynb"
MARKER = re.compile(r"^# %%(?P<markdown> \[markdown\])?\s*$")


def notebook_from_percent(text: str) -> nbformat.NotebookNode:
    """The cells of a percent-format script, in order; text before the first marker is left out."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        match = MARKER.match(line)
        if match:
            cells.append(("markdown" if match["markdown"] else "code", []))
        elif cells:
            cells[-1][1].append(line)
    notebook = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    for number, (kind, lines) in enumerate(cells):
        if kind == "markdown":
            lines = [re.sub(r"^# ?", "", line) for line in lines]
            cell = nbformat.v4.new_markdown_cell("\n".join(lines).strip("\n"))
        else:
            cell = nbformat.v4.new_code_cell("\n".join(lines).strip("\n"))
        cell.id = f"cell-{number}"  # stable ids: a rebuild changes only what changed
        notebook.cells.append(cell)
    return notebook


def execute(notebook: nbformat.NotebookNode, cell_timeout: int = 300) -> nbformat.NotebookNode:
    """Run every cell in order on a fresh python3 kernel in the project's root; a failing cell raises
    nbclient's CellExecutionError."""
    client = NotebookClient(notebook, timeout=cell_timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(PROJECT_DIR)}})
    return client.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-execute", action="store_true", help="write the notebook without running it")
    args = parser.parse_args()
    notebook = notebook_from_percent(SOURCE.read_text())
    if not args.no_execute:
        notebook = execute(notebook)
    nbformat.write(notebook, NOTEBOOK)
    print(f"wrote {NOTEBOOK.relative_to(PROJECT_DIR)} ({NOTEBOOK.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
