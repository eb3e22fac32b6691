"""Sweeps in MLflow: every `python train.py -m ...` gets one parent run, and each of its jobs is a
child run tagged with the sweep id, so the MLflow UI shows the sweep grouped.

The Hydra callback creates the store, the experiment and the parent run once in the launching
process, before any job starts (parallel jobs would race creating them), and leaves the parent's
id in the sweep directory, where every job, in-process or in a joblib worker, finds it.
"""

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments.tracking import setup_experiment

SWEEP_FILE = "mlflow_sweep.json"


@dataclass(frozen=True)
class Sweep:
    sweep_id: str
    parent_run_id: str


def read_sweep(sweep_dir: str) -> Sweep:
    return Sweep(**json.loads((Path(sweep_dir) / SWEEP_FILE).read_text()))


class MLflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        experiment_id = setup_experiment(config.tracking.uri, config.tracking.experiment)
        sweep_id = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        overrides = " ".join(config.hydra.overrides.task)
        parent = mlflow.MlflowClient().create_run(
            experiment_id,
            run_name=f"sweep-{sweep_id}",
            tags={"sweep_id": sweep_id, "sweep_parent": "true", "sweep_overrides": overrides},
        )
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep = Sweep(sweep_id, parent.info.run_id)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep.__dict__))
        print(f"MLflow sweep {sweep_id}: parent run {sweep.parent_run_id}")

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = read_sweep(config.hydra.sweep.dir)
        client = mlflow.MlflowClient()
        if client.get_run(sweep.parent_run_id).info.status == "RUNNING":  # no job ended it FAILED/KILLED
            client.set_terminated(sweep.parent_run_id, "FINISHED")


def end_sweep_early(sweep: Sweep, status: str) -> None:
    """A job of the sweep failed (FAILED) or was interrupted (KILLED): the parent run says so, since
    Hydra stops the sweep without calling ``on_multirun_end``."""
    mlflow.MlflowClient().set_terminated(sweep.parent_run_id, status)
