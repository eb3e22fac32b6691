"""The teaching notebooks (notebooks/*.py, jupytext percent scripts) run top to bottom, each in a fresh kernel of
this venv, as a reader runs them. Every notebook asserts its own numbers (the worked examples' values), so an
error, or a number that drifted from the text, fails its test; the cell that failed and its traceback are in the
failure. ``pytest -m notebooks`` runs exactly these.
"""

import os
import resource
import sys
import time

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from experiments import PROJECT_ROOT

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
TRAINING = ("04_from_layers_to_lenet", "05_comparing_architectures")  # they train runs: slow
KERNEL = "python3"  # ipykernel's own kernel; its "python" is this interpreter (jupyter_client's rule)
CELL_TIMEOUT = 300  # seconds: a cell that hangs fails instead of holding the suite
# What the notebook's kernel learns from its environment (notebooks/lesson.py): where to train.
STORE_VARIABLE = "LENET_LAB_NOTEBOOK_STORE"

pytestmark = pytest.mark.notebooks


def test_every_notebook_is_found():
    assert [path.stem[:2] for path in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", [pytest.param(path, id=path.stem, marks=[pytest.mark.slow] * (path.stem in TRAINING))
                                  for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    notebook = jupytext.read(path)
    assert not any(cell.get("outputs") for cell in notebook.cells), f"{path.name} carries outputs"
    # First, a cell of the test's own: the kernel runs this venv's interpreter, so it imports this checkout.
    notebook.cells.insert(0, nbformat.v4.new_code_cell(f"import sys\nassert sys.executable == {sys.executable!r}"))
    client = NotebookClient(notebook, kernel_name=KERNEL, timeout=CELL_TIMEOUT,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    # Figures drawn as a reader's Jupyter draws them (inline PNGs), whatever this shell's MPLBACKEND says.
    env = {**os.environ, STORE_VARIABLE: f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    started, cpu = time.perf_counter(), kernel_cpu_seconds()
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        pytest.fail(f"{path.name} stopped in a cell:\n{e}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - started:.1f} s, kernel CPU {kernel_cpu_seconds() - cpu:.1f} s")


def kernel_cpu_seconds() -> float:
    """CPU time (user + system) of this process's finished children: the kernel, once it has been shut down. On a
    machine shared with other work, a notebook's cost that its wall time hides."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
