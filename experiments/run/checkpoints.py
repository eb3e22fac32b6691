"""Per-epoch checkpoints: the weights, the optimizer's state, the state of the layers' random generators (dropout's
draws), the number of finished epochs and the last epoch's metrics (those training determines: a checkpoint depends on
the seed alone); with ``trainer.keep=best``, also the epoch kept so far (``Kept``): its number, validation metrics and
weights.

One file per run, ``checkpoint.npz``, written atomically (to a temporary name, then renamed: a kill
during the write leaves the previous checkpoint whole), kept on this machine beside the store and
logged as the run's ``checkpoint/`` artifact (by the ``EpochLogger`` callback, before it logs the epoch's
metrics: every epoch the store says finished has its checkpoint), so a run can resume on another machine
through the tracking URI. Only the latest is kept.
"""

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
from omegaconf import DictConfig

from experiments.errors import UserError
from experiments.store.tracking import local_run_dir

FILE = "checkpoint.npz"
METRIC = "metric_"  # the key of each of the last epoch's metrics in the file
KEPT = "kept_"  # the key of the kept epoch's number, validation metrics and weights in the file
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

    def save(self, model: keras.Model, epochs_done: int, metrics: dict[str, float] | None = None,
             kept: "Kept | None" = None) -> None:
        """Write the checkpoint of ``epochs_done`` finished epochs, with the last one's ``metrics`` (logged from
        here on resume if the process died before it logged them; each a ``metric_<name>`` number) and the
        ``kept`` epoch; the caller logs the file. A partial file that a kill left behind is removed first."""
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{FILE}.partial"
        partial.unlink(missing_ok=True)
        with open(partial, "wb") as f:
            np.savez(f, epochs_done=epochs_done,
                     **{f"{METRIC}{name}": np.float64(value) for name, value in (metrics or {}).items()},
                     **{f"weight_{i}": w for i, w in enumerate(model.get_weights())},
                     **{f"optimizer_{i}": keras.ops.convert_to_numpy(v)
                        for i, v in enumerate(model.optimizer.variables)},
                     **{f"random_{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(random_states(model))},
                     **(kept.arrays() if kept is not None and kept.weights is not None else {}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, self.path)
        folder = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself, on disk before the epoch is logged
        finally:
            os.close(folder)

    def fetch(self, run_id: str, epochs_logged: int = 0) -> Path | None:
        """The checkpoint to resume from: the local one, else the run's logged one downloaded here (another
        machine, or a local one older than the ``epochs_logged`` the store has: the run went on elsewhere);
        None when the run has none."""
        if self.path.is_file() and epochs_in(self.path) >= epochs_logged:
            return self.path
        logged = mlflow.MlflowClient().list_artifacts(run_id, ARTIFACT_DIR)
        if not any(artifact.path == f"{ARTIFACT_DIR}/{FILE}" for artifact in logged):
            return self.path if self.path.is_file() else None
        self.directory.mkdir(parents=True, exist_ok=True)
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/{FILE}",
                                                        dst_path=str(self.directory)))


@dataclass
class Kept:
    """The epoch a ``trainer.keep=best`` run keeps: of those seen so far, the one with the highest val_accuracy (the
    lower val_loss on a tie; the earlier epoch on a full tie), with its weights (None before the first epoch)."""

    epoch: int = 0
    val_accuracy: float = -np.inf
    val_loss: float = np.inf
    weights: list[np.ndarray] | None = None

    def offer(self, epoch: int, metrics: dict[str, float], model: keras.Model) -> None:
        """Keep ``epoch`` (1-based) and the model's weights if its ``metrics`` beat the kept epoch's."""
        accuracy, loss = metrics["val_accuracy"], metrics["val_loss"]
        if (accuracy, -loss) > (self.val_accuracy, -self.val_loss):
            self.epoch, self.val_accuracy, self.val_loss, self.weights = epoch, accuracy, loss, model.get_weights()

    def arrays(self) -> dict[str, np.ndarray]:
        """As a checkpoint file holds it."""
        return {f"{KEPT}epoch": np.int64(self.epoch), f"{KEPT}val_accuracy": np.float64(self.val_accuracy),
                f"{KEPT}val_loss": np.float64(self.val_loss),
                **{f"{KEPT}weight_{i}": w for i, w in enumerate(self.weights)}}

    @classmethod
    def read(cls, path: Path | None) -> "Kept":
        """The kept epoch a checkpoint file of a ``trainer.keep=best`` run holds; none for no file (a new run)."""
        if path is None:
            return cls()
        with np.load(path) as saved:
            count = sum(name.startswith(f"{KEPT}weight_") for name in saved.files)
            return cls(int(saved[f"{KEPT}epoch"]), float(saved[f"{KEPT}val_accuracy"]),
                       float(saved[f"{KEPT}val_loss"]), [saved[f"{KEPT}weight_{i}"] for i in range(count)])


def epochs_in(path: Path) -> int:
    """The finished epochs a checkpoint file holds."""
    with np.load(path) as saved:
        return int(saved["epochs_done"])


def epochs_logged(run_id: str) -> int:
    """The last epoch whose metrics the run logged (``EpochLogger``: the loss at step epoch + 1); 0 for none."""
    return max((m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")), default=0)


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: its checkpoint (None: from its start) and the epochs its store has logged."""

    path: Path | None
    epochs_logged: int


def resume_point(checkpoints: Checkpoints, run_id: str) -> ResumePoint:
    """The checkpoint a run continues from, looked up before the run is taken up again: a run killed before its
    first checkpoint starts again from epoch 0; one whose store logged epochs that no checkpoint of it holds
    (they were deleted) is refused in one line (``UserError``)."""
    logged = epochs_logged(run_id)
    path = checkpoints.fetch(run_id, logged)
    saved = epochs_in(path) if path else 0
    if saved < logged:
        holds = f"its newest checkpoint holds {saved}" if path else "it has no checkpoint"
        epochs = f"{logged} epoch{'s' * (logged != 1)}"
        raise UserError(f"resume={run_id}: the run logged {epochs} but {holds} (in {checkpoints.directory} or among "
                        "its artifacts); start it again without resume=.")
    return ResumePoint(path, logged)


def saved_metrics(path: Path) -> dict[str, float]:
    """The metrics of the last epoch a checkpoint holds (empty for a checkpoint written without them)."""
    with np.load(path) as saved:
        return {name.removeprefix(METRIC): float(saved[name]) for name in saved.files if name.startswith(METRIC)}


def restore_run(model: keras.Model, run_id: str, path: Path) -> int:
    """``restore``, and a checkpoint that cannot be read or does not fit the model as one line."""
    try:
        return restore(model, path)
    except (ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"resume={run_id}: its checkpoint {path} cannot be restored ({e}).") from None


def random_states(model: keras.Model) -> list[keras.Variable]:
    """The model's variables that are no weights: the states of its layers' random generators (``SeedGenerator``,
    e.g. dropout's), which go on from where they were so that a resumed run draws what the run never stopped would."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def restore(model: keras.Model, path: Path) -> int:
    """Load weights, optimizer state and random generators' states into a compiled model; returns the finished
    epochs."""
    with np.load(path) as saved:
        weights = [saved[f"weight_{i}"] for i in range(len(model.get_weights()))]
        model.set_weights(weights)
        model.optimizer.build(model.trainable_variables)
        for i, variable in enumerate(model.optimizer.variables):
            variable.assign(saved[f"optimizer_{i}"])
        for i, variable in enumerate(random_states(model)):
            variable.assign(saved[f"random_{i}"])
        return int(saved["epochs_done"])
