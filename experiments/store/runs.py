"""Training runs as read back from the store: which runs match, which are left out and why, each finished run
reduced to what a comparison needs, the best run, and this host's dead runs marked KILLED.

One seed counts once: of several finished runs of the same model, dataset and seed (a standalone run and a
sweep's, say), only the latest (by start time) is kept, the others are returned as duplicates.

Runs that are not FINISHED are left out and counted by reason. This host's runs whose process is gone are marked
KILLED (``mark_dead_runs``: every run records its host, pid and the process's start time, so a reused pid is not
mistaken for the run's process); a RUNNING run of another host, whose process this machine cannot see, counts as
"stale" once its latest metric (its start, before the first) is more than ``stale_after_minutes`` old.

Each training run logs its test-set predictions as ``test_predictions.npz`` at its artifact root (``y_true`` and
``y_pred``, int64 (N,), ``probabilities``, float32 (N, classes)); ``load_predictions`` reads them back for the
paired tests of the comparison. Runs logged before that artifact existed ("older runs") have none: they are
compared without the tests on predictions.
"""

import os
import socket
import statistics
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from experiments.errors import UserError
from experiments.store.tracking import sqlite_path

PARENT_RUN_TAG = "mlflow.parentRunId"
NOT_TUNED = "not tuned"  # a run trained at its config's hyperparameters
STUDY_TAG = "hparams.study"  # set on a run trained at a study's setting (train.py hparams=tuned)
BUDGET_TAG = "hparams.budget"  # and what that study had spent: "<trials> trials x <epochs> epochs"
REQUIRED_TAGS = ("model", "layers", "dataset")
REQUIRED_METRICS = ("test_accuracy", "test_loss", "parameter_count", "val_accuracy", "epoch_seconds",
                    "images_per_second")
REQUIRED_PARAMS = ("trainer.epochs", "seed")
LEFT_OUT_ORDER = ("failed", "killed", "stale", "running", "scheduled", "incomplete")
STALE_AFTER_MINUTES = 60  # compare.yaml's default
PREDICTIONS_ARTIFACT = "test_predictions.npz"  # at the run's artifact root


@dataclass(frozen=True)
class RunSummary:
    """One finished training run, reduced to what the comparison needs."""

    run_id: str
    parent_run_id: str | None
    model: str
    layers: str
    dataset: str
    seed: str
    start_time: int  # milliseconds since the epoch
    epochs: int
    parameter_count: int
    test_accuracy: float
    test_loss: float
    epoch_seconds: float  # mean over the run's epochs
    images_per_second: float  # mean over the run's epochs
    val_accuracy: dict[int, float]  # epoch -> validation accuracy
    final_val_accuracy: float  # the last epoch's
    tuning: str = NOT_TUNED  # the budget of the study its setting came from (BUDGET_TAG)


@dataclass(frozen=True)
class Selection:
    """The runs a comparison is made of, and how they were chosen."""

    experiment: str
    filter_string: str
    runs: list[RunSummary]  # one per model, dataset and seed
    left_out: Counter  # reason ("failed", "running", ...) -> number of runs
    duplicates: list[RunSummary]  # finished runs dropped for a later one of the same model, dataset and seed


# --- Reading the runs -------------------------------------------------------------------------------


def open_store(uri: str) -> MlflowClient:
    """A client for an existing store: a report never creates an empty database as a side effect."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(f"tracking.uri {uri!r}: no MLflow database at {db}.")
    return MlflowClient(uri)


def search_filter(sweep_id: str | None, extra_filter: str | None) -> str:
    """The MLflow filter string for the optional sweep id and extra filter, joined with ``and``."""
    parts = []
    if sweep_id is not None:
        parts.append(f"tags.sweep_id = '{sweep_id}'")
    if extra_filter:
        parts.append(extra_filter)
    return " and ".join(parts)


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """The id of the experiment named; an unknown name is the user's mistake."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"tracking.experiment {experiment!r}: no such experiment in {client.tracking_uri}.")
    return found.experiment_id


def search_runs(client: MlflowClient, experiment: str, filter_string: str) -> list[Run]:
    """Every active run of the experiment that matches the filter, all result pages."""
    found = experiment_id(client, experiment)
    runs, page_token = [], None
    while True:
        try:
            page = client.search_runs([found], filter_string, max_results=1000, page_token=page_token)
        except MlflowException as e:
            raise UserError(f"invalid search filter {filter_string!r} (from sweep_id/filter): {e.message}") from None
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def is_sweep_parent(run: Run) -> bool:
    return run.data.tags.get("sweep_parent") == "true"


def last_logged(client: MlflowClient, run: Run) -> int:
    """When the run last logged a metric, else when it started (milliseconds since the epoch)."""
    history = (client.get_metric_history(run.info.run_id, key) for key in run.data.metrics)
    return max([run.info.start_time, *(metric.timestamp for metrics in history for metric in metrics)])


def is_stale(client: MlflowClient, run: Run, stale_after_minutes: float) -> bool:
    """Another host's RUNNING run that has logged nothing for ``stale_after_minutes``: its process is
    most likely gone, where this machine cannot look (this host's dead runs are marked KILLED)."""
    if run.info.status != "RUNNING" or run.data.tags.get("host") == socket.gethostname():
        return False
    return time.time() * 1000 - last_logged(client, run) > stale_after_minutes * 60_000


def left_out_reason(client: MlflowClient, run: Run, stale_after_minutes: float) -> str | None:
    """Why a run stays out of the table (its status, "stale", or missing results), None when it is in."""
    if is_stale(client, run, stale_after_minutes):
        return "stale"
    if run.info.status != "FINISHED":
        return run.info.status.lower()
    complete = (all(tag in run.data.tags for tag in REQUIRED_TAGS)
                and all(metric in run.data.metrics for metric in REQUIRED_METRICS)
                and all(param in run.data.params for param in REQUIRED_PARAMS))
    return None if complete else "incomplete"


def metric_by_epoch(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)}


def summarise_run(client: MlflowClient, run: Run) -> RunSummary:
    tags, metrics, run_id = run.data.tags, run.data.metrics, run.info.run_id
    return RunSummary(
        run_id=run_id,
        parent_run_id=tags.get(PARENT_RUN_TAG),
        model=tags["model"],
        layers=tags["layers"],
        dataset=tags["dataset"],
        seed=run.data.params["seed"],
        start_time=run.info.start_time,
        epochs=int(run.data.params["trainer.epochs"]),
        parameter_count=int(metrics["parameter_count"]),
        test_accuracy=metrics["test_accuracy"],
        test_loss=metrics["test_loss"],
        epoch_seconds=statistics.mean(metric_by_epoch(client, run_id, "epoch_seconds").values()),
        images_per_second=statistics.mean(metric_by_epoch(client, run_id, "images_per_second").values()),
        val_accuracy=metric_by_epoch(client, run_id, "val_accuracy"),
        final_val_accuracy=metrics["val_accuracy"],  # MLflow's latest value: the highest step's
        tuning=tuning(tags),
    )


def tuning(tags: dict[str, str]) -> str:
    """How a run's hyperparameters were chosen: its study's budget, or NOT_TUNED."""
    if STUDY_TAG not in tags:
        return NOT_TUNED
    return f"tuned, {tags.get(BUDGET_TAG, 'budget not recorded')}"


def drop_duplicate_seeds(runs: list[RunSummary]) -> tuple[list[RunSummary], list[RunSummary]]:
    """The runs with one per model, dataset and seed (the latest by start time, then by run id), and
    the older ones dropped. Both keep the order of ``runs``."""
    latest: dict[tuple[str, str, str], RunSummary] = {}
    for run in runs:
        key = (run.model, run.dataset, run.seed)
        if key not in latest or (run.start_time, run.run_id) > (latest[key].start_time, latest[key].run_id):
            latest[key] = run
    kept = {run.run_id for run in latest.values()}
    return [run for run in runs if run.run_id in kept], [run for run in runs if run.run_id not in kept]


def load_runs(client: MlflowClient, experiment: str, sweep_id: str | None = None, extra_filter: str | None = None,
              stale_after_minutes: float = STALE_AFTER_MINUTES) -> Selection:
    """The finished training runs that match (sweep parent runs are never among them), and a count
    of the matching runs left out by reason."""
    filter_string = search_filter(sweep_id, extra_filter)
    runs, left_out = [], Counter()
    for run in search_runs(client, experiment, filter_string):
        if is_sweep_parent(run):
            continue
        reason = left_out_reason(client, run, stale_after_minutes)
        if reason:
            left_out[reason] += 1
        else:
            runs.append(summarise_run(client, run))
    kept, duplicates = drop_duplicate_seeds(runs)
    return Selection(experiment, filter_string, kept, left_out, duplicates)


def sweep_parent(client: MlflowClient, runs: list[RunSummary]) -> str | None:
    """The id of the sweep parent run when all the runs are children of the same one, else None."""
    parents = {run.parent_run_id for run in runs}
    if len(parents) != 1 or None in parents:
        return None
    (parent_id,) = parents
    return parent_id if is_sweep_parent(client.get_run(parent_id)) else None


# --- Test-set predictions -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Predictions:
    """One run's test-set predictions, in the test set's order."""

    y_true: np.ndarray  # int64 (N,): the labels
    y_pred: np.ndarray  # int64 (N,): the predicted classes
    probabilities: np.ndarray  # float32 (N, classes): the model's class probabilities


def predictions_from_file(path: Path) -> Predictions:
    """The arrays of a test_predictions.npz; ``ValueError`` naming what is wrong with a file that is not one."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("an .npy array")
        with loaded as npz:
            arrays = {key: npz[key] for key in ("y_true", "y_pred", "probabilities") if key in npz.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # a pickle, text, a truncated file
        raise ValueError("not an .npz archive of arrays") from e
    missing = [key for key in ("y_true", "y_pred", "probabilities") if key not in arrays]
    if missing:
        raise ValueError(f"no array {', '.join(missing)}")
    y_true, y_pred, probabilities = arrays["y_true"], arrays["y_pred"], arrays["probabilities"]
    n = len(y_true)
    if y_true.ndim != 1 or y_pred.shape != (n,) or probabilities.ndim != 2 or probabilities.shape[0] != n or n == 0:
        raise ValueError(f"shapes y_true {y_true.shape}, y_pred {y_pred.shape}, probabilities {probabilities.shape}; "
                         "expected (N,), (N,), (N, classes)")
    if not (np.issubdtype(y_true.dtype, np.integer) and np.issubdtype(y_pred.dtype, np.integer)):
        raise ValueError(f"labels of type {y_true.dtype} / {y_pred.dtype}, not integers")
    return Predictions(y_true.astype(np.int64), y_pred.astype(np.int64), probabilities.astype(np.float32))


def read_predictions(client: MlflowClient, run_id: str, directory: Path) -> Predictions | None:
    """The run's test_predictions.npz, downloaded into ``directory``; None when the run has none (an older run);
    ``ValueError`` when the file is not one."""
    if PREDICTIONS_ARTIFACT not in {artifact.path for artifact in client.list_artifacts(run_id)}:
        return None
    local = client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, str(directory / run_id))
    return predictions_from_file(Path(local))


def load_predictions(client: MlflowClient, runs: list[RunSummary]) -> tuple[dict[str, Predictions], dict[str, str]]:
    """The test-set predictions of every run that logged them (run id -> predictions), and the runs whose
    test_predictions.npz could not be read (run id -> why). Runs in neither are older runs, without the artifact."""
    found, unreadable = {}, {}
    with tempfile.TemporaryDirectory(prefix="compare-predictions-") as directory:
        for run in runs:
            try:
                predictions = read_predictions(client, run.run_id, Path(directory))
            except ValueError as e:
                unreadable[run.run_id] = str(e)
                continue
            if predictions is not None:
                found[run.run_id] = predictions
    return found, unreadable


# --- Where a run's model is -----------------------------------------------------------------------


MODEL_ARTIFACT = "model"  # every training run logs its model under this name (experiments.store.logged)


def runs_uri(run_id: str) -> str:
    """The MLflow URI of the model a run logged: ``runs:/<run id>/model``."""
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


# --- The best run ---------------------------------------------------------------------------------


def finished_runs(client: MlflowClient, experiment: str) -> list:
    """The experiment's FINISHED training runs, best final validation accuracy first (ties: the later
    run); empty when the experiment does not exist."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], "attributes.status = 'FINISHED' and metrics.val_accuracy >= 0",
                              order_by=["metrics.val_accuracy DESC", "attributes.start_time DESC"],
                              max_results=50000)


def best_run(client: MlflowClient, experiment: str):
    """The FINISHED training run with the best final validation accuracy, and the number of runs
    it was chosen from; (None, 0) when there is none."""
    runs = finished_runs(client, experiment)
    return (runs[0] if runs else None), len(runs)


# --- Where a run runs -------------------------------------------------------------------------------


def process_start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), or None."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": str(pid), "pid_started": process_start_ticks(pid) or ""}


def process_alive(tags: dict[str, str]) -> bool:
    """Whether the process a run's tags name still runs (on this host)."""
    pid = int(tags["pid"])
    started = process_start_ticks(pid)
    return started is not None and started == tags.get("pid_started", started)


def mark_dead_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """Mark this host's RUNNING runs whose process is gone KILLED; returns their ids."""
    host = socket.gethostname()
    runs = client.search_runs(experiment_ids, f"attributes.status = 'RUNNING' and tags.host = '{host}'",
                              max_results=50000)
    dead = [run for run in runs if run.data.tags.get("pid", "").isdigit() and not process_alive(run.data.tags)]
    for run in dead:
        client.set_tag(run.info.run_id, "error", f"process {run.data.tags['pid']} on {host} disappeared")
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in dead]
