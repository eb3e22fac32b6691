"""Per-epoch checkpoints: the weights, the optimizer's state and the number of finished epochs.

One file per run, ``checkpoint.npz``, written atomically (to a temporary name, then renamed: a kill
during the write leaves the previous checkpoint whole), kept on this machine beside the store and
logged as the run's ``checkpoint/`` artifact (by the ``SaveCheckpoint`` callback), so a run can
resume on another machine through the tracking URI. Only the latest is kept.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from experiments.errors import UserError
from experiments.store.tracking import local_run_dir

FILE = "checkpoint.npz"
ARTIFACT_DIR = "checkpoint"


def checkpoint_dir(tracking: DictConfig, run_id: str) -> Path:
    """Where this machine keeps a run's checkpoint (``checkpoints/<run id>``, see local_run_dir)."""
    return local_run_dir(tracking, "checkpoints", run_id)


@dataclass
class Checkpoints:
    """The checkpoint of one run: saved locally and to the run's artifacts after every epoch."""

    directory: Path

    @property
    def path(self) -> Path:
        return self.directory / FILE

    def save(self, model: keras.Model, epochs_done: int) -> None:
        """Write the checkpoint of ``epochs_done`` finished epochs (the caller logs the file)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{FILE}.partial"
        with open(partial, "wb") as f:
            np.savez(f, epochs_done=epochs_done,
                     **{f"weight_{i}": w for i, w in enumerate(model.get_weights())},
                     **{f"optimizer_{i}": keras.ops.convert_to_numpy(v)
                        for i, v in enumerate(model.optimizer.variables)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)

    def fetch(self, run_id: str) -> Path:
        """The local checkpoint, or the run's logged one downloaded here (another machine)."""
        if self.path.is_file():
            return self.path
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/{FILE}",
                                                            dst_path=str(self.directory)))
        except (MlflowException, OSError):
            raise UserError(f"resume={run_id}: the run has no checkpoint (it stopped before its first epoch "
                            "ended); start it again without resume=.") from None


def restore(model: keras.Model, path: Path) -> int:
    """Load weights and optimizer state into a compiled model; returns the finished epochs."""
    with np.load(path) as saved:
        weights = [saved[f"weight_{i}"] for i in range(len(model.get_weights()))]
        model.set_weights(weights)
        model.optimizer.build(model.trainable_variables)
        for i, variable in enumerate(model.optimizer.variables):
            variable.assign(saved[f"optimizer_{i}"])
        return int(saved["epochs_done"])
