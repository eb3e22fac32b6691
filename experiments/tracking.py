"""MLflow plumbing: where runs are stored, the flattened config as params, run status on failure."""

import contextlib
import fcntl
import subprocess
import traceback
from pathlib import Path

import mlflow
from omegaconf import DictConfig, OmegaConf

from experiments import PROJECT_ROOT

SQLITE = "sqlite:///"


def resolve_tracking_uri(uri: str | None) -> str:
    """``None`` means the project's own store, ``sqlite:///<project root>/mlflow.db``; a relative
    sqlite path is taken from the project root too. Other URIs (a tracking server) pass through."""
    if uri is None:
        return f"{SQLITE}{PROJECT_ROOT / 'mlflow.db'}"
    if uri.startswith(SQLITE):
        return f"{SQLITE}{PROJECT_ROOT / uri[len(SQLITE):]}"  # an absolute path stays as it is
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a resolved ``sqlite:///`` URI, None for any other store."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise store/experiment creation: parallel jobs creating one sqlite DB at once race."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def setup_experiment(uri: str | None, name: str) -> str:
    """Point MLflow at the store and return the experiment id, creating store and experiment once.

    For a sqlite store, artifacts go to ``mlruns/<experiment>`` beside the database file, whatever
    the current directory (MLflow's own default is ``./mlruns`` relative to the cwd).
    """
    uri = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        db = sqlite_path(uri)
        location = (db.parent / "mlruns" / name).as_uri() if db else None
        return mlflow.create_experiment(name, artifact_location=location)


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Resolved config as MLflow params with dotted keys: ``{"model.name": "lenet", ...}``."""
    flat: dict[str, str] = {}

    def visit(node, prefix):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    visit(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@contextlib.contextmanager
def tracked_run(experiment_id: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None):
    """An MLflow run that ends FINISHED, FAILED (error kept as tag and artifact) or KILLED (Ctrl-C).

    Whatever was logged before the failure stays in the run.
    """
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags,
                          parent_run_id=parent_run_id) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.set_tag("error", "interrupted (KeyboardInterrupt)")
            mlflow.end_run("KILLED")
            raise
        except BaseException as e:
            mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run("FAILED")
            raise
