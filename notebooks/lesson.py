"""What the teaching notebooks share: a quiet start, notebook 1 and 2's worked example, a matrix drawn with its
numbers, the MLflow store the notebooks train into, and train.py's config for a list of overrides.

Imported first by every notebook (``import lesson``), from the notebooks' own folder.
"""

import functools
import logging
import os
import tempfile
import warnings
from pathlib import Path

# As the lab's commands start (experiments/cli.py): TensorFlow's C++ notices and MLflow's download bars off.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# TensorFlow's Python warnings (a run after another in one process: "retracing") are about speed, not the lesson.
logging.getLogger("tensorflow").setLevel(logging.ERROR)
# tqdm's notebook bars need ipywidgets, which the notebooks do without: its text bars are kept, its warning not.
warnings.filterwarnings("ignore", message="IProgress not found")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from experiments import PROJECT_ROOT  # noqa: E402  (importing it quiets TensorFlow's start, as train.py's is)

# The worked example of notebooks 1 and 2: a 5×5 image and a 2×2 kernel.
IMAGE = np.array([
    [0.51, 0.90, 0.88, 0.84, 0.05],
    [0.40, 0.62, 0.22, 0.59, 0.10],
    [0.11, 0.20, 0.74, 0.03, 0.14],
    [0.47, 0.00, 0.85, 0.70, 0.09],
    [0.76, 0.19, 0.72, 0.17, 0.57],
])
KERNEL = np.array([
    [-0.13, 0.15],
    [-0.51, 0.62],
])

# The tests set it to a store of their own; unset, each notebook run trains into a new temporary folder, never
# into the project's mlflow.db.
STORE_VARIABLE = "LENET_LAB_NOTEBOOK_STORE"


def matrix(ax, values, title, fmt="{:.4f}", boxes=(), cmap="RdBu_r", fontsize=9):
    """``values`` (rows, cols) as coloured cells with their numbers (a diverging map centred on 0), on ``ax``;
    each of ``boxes`` is ``(row, col, height, width)``, outlined in black."""
    values = np.asarray(values, dtype=float)
    limit = max(float(np.abs(values).max()), 1e-12)
    ax.imshow(values, cmap=cmap, vmin=-limit, vmax=limit)
    for (i, j), v in np.ndenumerate(values):
        ink = "white" if abs(v) > 0.6 * limit else "black"  # readable on the darkest cells
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=fontsize, color=ink)
    for row, col, height, width in boxes:
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), width, height, fill=False, lw=2.5, ec="black"))
    ax.set_title(title)
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(values.shape[0]))


def matrices(*panels, size=3.2):
    """One row of :func:`matrix` panels, each ``(values, title)`` or ``(values, title, {options})``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size))
    for ax, (values, title, *options) in zip(np.atleast_1d(axes), panels, strict=True):
        matrix(ax, values, title, **(options[0] if options else {}))
    fig.tight_layout()
    return fig


def assert_close(actual, expected, atol):
    """``actual`` equals ``expected`` within ``atol`` everywhere, with no relative slack (5e-9: the same to the 8
    decimals NumPy prints)."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


@functools.cache
def store_uri() -> str:
    """The sqlite store the notebook trains into: ``$LENET_LAB_NOTEBOOK_STORE``, else one in a new temporary folder
    (the same for the whole kernel)."""
    return os.environ.get(STORE_VARIABLE) or f"sqlite:///{tempfile.mkdtemp(prefix='lenet-lab-notebook-')}/mlflow.db"


def work_dir(name: str) -> Path:
    """The folder ``name`` beside the store (made if need be), for the notebook's own files."""
    folder = Path(store_uri().removeprefix("sqlite:///")).parent / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def train_config(*overrides):
    """train.py's config (conf/train.yaml) for these overrides, as ``python train.py <overrides>`` composes it."""
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))
