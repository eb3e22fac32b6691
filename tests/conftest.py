import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments import PROJECT_ROOT  # noqa: E402

CONF_DIR = str(PROJECT_ROOT / "conf")

# A few thousand images and small epochs: enough to learn well above chance in seconds.
TINY = ["data.train_size=3000", "data.test_size=1000", "trainer.epochs=2"]


def compose_train(overrides=()):
    """The resolved train.py config for the given overrides (no Hydra run)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A throwaway MLflow store: tests never touch the project's own mlflow.db / mlruns/."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def no_project_store(tmp_path_factory, monkeypatch):
    """Safety net: whatever a test forgets to point elsewhere lands in a temporary store."""
    import mlflow

    fallback = f"sqlite:///{tmp_path_factory.mktemp('fallback_store') / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fallback)
    mlflow.set_tracking_uri(fallback)
    yield
    mlflow.set_tracking_uri(fallback)


def train_in_store(store_dir: Path, runs: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    """Train each named list of overrides in-process into a new sqlite store in store_dir; returns
    the store's URI and the run id of each name."""
    from experiments.training import train

    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    return uri, {name: train(compose_train([*overrides, f"tracking.uri={uri}"])).run_id
                 for name, overrides in runs.items()}


@pytest.fixture
def store(trained):
    """The test module's ``trained`` (uri, runs), as this test's MLflow tracking URI."""
    import mlflow

    mlflow.set_tracking_uri(trained[0])
    return trained


def run_train(args, tmp_path: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` from an unrelated directory, Hydra's outputs in tmp_path."""
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), *args,
           f"hydra.run.dir={tmp_path}/hydra", f"hydra.sweep.dir={tmp_path}/multirun"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
