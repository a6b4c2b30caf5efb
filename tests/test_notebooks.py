"""Specification of notebooks/: each notebook is what notebooks/build_notebooks.py writes, carries no outputs,
and runs top to bottom (nbclient, a real Jupyter kernel) on the tiny configuration (LLM_NOTEBOOKS_SMALL=1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")  # the dev extra installs nbformat, nbclient and ipykernel

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import build_notebooks  # noqa: E402

NAMES = sorted(build_notebooks.NOTEBOOKS)


def test_there_are_three_or_four_notebooks_and_each_is_committed():
    assert 3 <= len(NAMES) <= 4
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_a_committed_notebook_carries_no_outputs_and_matches_its_generator(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: a cell has outputs; clear them"
    assert notebook == build_notebooks.build(name), f"{name} differs from build_notebooks.py: run it again"


@pytest.fixture(scope="module")
def small_env(tmp_path_factory):
    """The tiny configuration, for the kernels nbclient starts (they inherit this environment), with one model
    cache for the session (shared with tests/test_docs.py: whichever runs first trains the tiny model)."""
    cache = tmp_path_factory.getbasetemp() / "notebooks-cache"
    keys = {"LLM_NOTEBOOKS_SMALL": "1", "LLM_NOTEBOOKS_CACHE": str(cache),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    yield cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.pipeline
@pytest.mark.parametrize("name", NAMES)
def test_the_notebook_runs_top_to_bottom(name, small_env):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # a failing cell raises CellExecutionError with its traceback
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "a tiny model trained on the project's docs" in printed
