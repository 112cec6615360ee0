"""The layout a reader relies on: entry points at the top, a library under vae/ and tasks/ that never
imports them, and nothing at all that imports train.py (it is the loop, not a library)."""
from __future__ import annotations

import ast

from conftest import PROJECT_DIR

ENTRY_POINTS = {"train", "evaluate", "variance", "bench", "report", "faults"}
SOURCES = sorted(p for p in PROJECT_DIR.rglob("*.py")
                 if not p.relative_to(PROJECT_DIR).parts[0].startswith((".", "tests", "docs")))
TUTORIAL = PROJECT_DIR / "docs" / "tutorial.py"  # a reader of the project, as the tests are: it may use variance.py


def imported_modules(path) -> set[str]:
    """The top-level names of every module `path` imports (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_sources_are_found():
    found = {str(p.relative_to(PROJECT_DIR)) for p in SOURCES}
    assert {"train.py", "model.py", "guide.py", "vae/build.py", "tasks/impute.py"} <= found


def test_nothing_imports_an_entry_point():
    for path in SOURCES:
        imports = imported_modules(path) & ENTRY_POINTS
        assert not imports, f"{path.relative_to(PROJECT_DIR)} imports {sorted(imports)}"


def test_the_tutorial_uses_the_library_and_never_train_py():
    imports = imported_modules(TUTORIAL)
    assert {"model", "guide", "vae"} <= imports and not imports & {"train", "evaluate", "report", "faults", "bench"}


def test_model_and_guide_hold_the_derivation_only():
    """model.py and guide.py import neither Hydra nor the library: data flows conf -> entry point ->
    library -> model/guide."""
    for name in ("model.py", "guide.py"):
        imports = imported_modules(PROJECT_DIR / name)
        assert not imports & {"hydra", "omegaconf", "vae", "tasks", *ENTRY_POINTS}, (name, imports)
