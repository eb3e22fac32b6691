"""What ``python train.py`` does around one run: resume resolution, the run, and how it ends for the
user — one line and an exit code for every way a run can stop early, never a traceback for those.

A run's first line (stdout, ``experiments.run.training.headline``) says what is trained on what and where it is
logged, or that a run is resumed.

| how it ends                      | printed (stderr)                                                 | exit          |
|----------------------------------|------------------------------------------------------------------|---------------|
| finished                         | run id, test metrics, the run's page in the UI (stdout)          | 0             |
| a bad setting                    | ``error: <field> ... got <value>.``                              | 2             |
| loss became NaN / inf            | ``error: loss became nan at epoch E, step S ...``                | 1             |
| a file or folder it cannot write | ``error: <reason>: <path>``                                      | 1             |
| the tracking server stayed away  | ``error: ... send them with: python -m experiments.store.offline`` | 1           |
| the tracking database is away    | ``error: tracking.uri <uri>: cannot connect to the database (...)`` | 1          |
| Ctrl-C / SIGTERM / SIGUSR2       | ``interrupted: run <id> marked KILLED; resume with ...``         | 130/143/140   |
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.errors import ServerAway, UserError, stop
from experiments.run.lifecycle import (
    Interrupted,
    catch_interrupts,
    interruption,
    resumable_run,
    resume_config,
)
from experiments.run.sweep import Sweep, earlier_run, end_sweep_early, job_sweep
from experiments.store.runs import process_start_ticks
from experiments.store.tracking import check_store, resolve_tracking_uri, run_page

if TYPE_CHECKING:  # experiments.run.training imports TensorFlow: loaded once the store has answered
    from experiments.run.training import RunResult

previous_job_end: float | None = None  # when this process's last job ended: a sweep's jobs may share one process


def process_started() -> float:
    """When this process started (``time.time()``, to 10 ms, from /proc); now where there is no /proc."""
    ticks = process_start_ticks(os.getpid())
    if ticks is None:
        return time.time()
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(ticks) / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def setup_began() -> float:
    """When this job's set-up began: the process's start (interpreter, imports, Hydra) for its first job, the
    previous job's end for the next ones."""
    return previous_job_end or process_started()


def start(cfg: DictConfig, overrides: list[str], sweep: Sweep | None,
          setup_started: float | None = None) -> RunResult | None:
    """Train ``cfg``, or with ``resume=<run id>`` continue that run with its logged config; ``sweep``: the
    sweep the job is one of. A job of a sweep resumed with ``sweep_resume=`` goes by its earlier run
    (``resume_sweep_job``). ``setup_started``: when the job's set-up began (``time.time()``; default: when
    ``train`` is called)."""
    if cfg.get("sweep_resume") and not sweep:
        raise UserError(f"sweep_resume={cfg.sweep_resume} resumes a sweep: give it with -m and the sweep's "
                        "overrides.")
    if sweep and cfg.get("sweep_resume"):
        return resume_sweep_job(cfg, overrides, sweep, setup_started)
    if cfg.get("resume"):
        return resume(cfg, overrides, sweep, str(cfg.resume), checked=overrides, setup_started=setup_started)
    return train_new(cfg, overrides, sweep, setup_started)


def train_new(cfg: DictConfig, overrides: list[str], sweep: Sweep | None,
              setup_started: float | None) -> RunResult | None:
    """Train ``cfg`` in a new run (a sweep job's run is tagged with the job's identity from its start)."""
    from experiments.run.training import train

    return train(cfg, overrides=overrides, sweep=sweep, setup_started=setup_started)


def resume(cfg: DictConfig, overrides: list[str], sweep: Sweep | None, run_id: str, checked: list[str],
           setup_started: float | None) -> RunResult | None:
    """Continue the run with its logged config; ``checked`` are the overrides that must not change it."""
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    client = mlflow.MlflowClient()
    run = resumable_run(client, run_id)
    resumed = resume_config(client, run, cfg, checked)
    from experiments.run.training import train

    return train(resumed, overrides=overrides, sweep=sweep, resume_run_id=run.info.run_id, setup_started=setup_started)


def resume_sweep_job(cfg: DictConfig, overrides: list[str], sweep: Sweep, setup_started: float | None) -> RunResult:
    """A job of a resumed sweep: skipped (its result reported) when its earlier run is FINISHED, that run
    continued when it stopped after a checkpoint, else trained in a new run (``experiments.run.sweep``)."""
    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking.uri))
    earlier = earlier_run(mlflow.MlflowClient(), sweep, overrides, cfg.tracking)
    if earlier is None:
        return train_new(cfg, overrides, sweep, setup_started)
    if earlier.info.status != "FINISHED":  # its overrides made its config
        return resume(cfg, overrides, sweep, earlier.info.run_id, checked=[], setup_started=setup_started)
    print(f"skipped: run {earlier.info.run_id} ({earlier.info.run_name}) is FINISHED", flush=True)
    from experiments.run.training import RunResult

    metrics = earlier.data.metrics
    return RunResult(earlier.info.run_id, earlier.info.experiment_id, metrics["test_loss"], metrics["test_accuracy"])


def launch(cfg: DictConfig, overrides: list[str], sweep_dir: str | None) -> float:
    """train.py's job: run, report, and turn every expected way of stopping into one line + exit code.
    ``sweep_dir`` is set when the job is one of a sweep (``-m``); the job's config names the sweep (``job_sweep``)."""
    global previous_job_end
    catch_interrupts()  # a job the scheduler kills or preempts is marked KILLED too
    sweep = job_sweep() if sweep_dir else None
    try:
        check_store(cfg.tracking.uri)  # down, or refusing the login: one line in seconds, before TensorFlow loads
        result = start(cfg, overrides, sweep, setup_began())
    except BaseException as e:
        if isinstance(e, ServerAway):
            box = e.outbox
            stop(f"error: the tracking server {box.tracking_uri} did not come back; {len(box.items)} deliveries of "
                 f"run {box.run_id} are kept in {box.folder}; send them with: python -m experiments.store.offline "
                 f"{box.folder}", 1)
        signum = interruption(e)
        if sweep:
            end_sweep_early(sweep, "FAILED" if signum is None else "KILLED")
        if isinstance(e, Interrupted):
            stop(f"interrupted: run {e.run_id} marked KILLED; resume with python train.py resume={e.run_id}",
                 e.exit_code)
        if signum is not None:  # before any run existed
            stop("interrupted before the run started", 128 + signum)
        raise  # the line and exit code of a bad setting, a failed run, ...: experiments.cli
    if result is None:  # a non-chief worker of a multi-worker run: the chief reports the run
        return float("nan")
    print(f"MLflow run id: {result.run_id}")
    print(f"test_loss={result.test_loss:.4f} test_accuracy={result.test_accuracy:.4f}")
    print(f"run page: {run_page(resolve_tracking_uri(cfg.tracking.uri), result.experiment_id, result.run_id)}",
          flush=True)
    previous_job_end = time.time()
    return result.test_accuracy


def main(cfg: DictConfig) -> float:
    """``python train.py``: one run, or one job of a sweep (``-m``); returns the test accuracy (a sweeper's
    objective)."""
    hydra_cfg = HydraConfig.get()
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    return launch(cfg, list(hydra_cfg.overrides.task), sweep_dir)
