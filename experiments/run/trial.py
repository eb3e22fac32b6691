"""A tuning trial's training run: train and validate, and nothing of the test split — no test pass, no test metric,
no test predictions, no test images in the run's inputs — and no model (``hparams=tuned`` trains the one to keep).

One MLflow run per call, a child of its study's parent run, logged as a training run is (params, per-epoch metrics,
timings, config.yaml) through the same pieces as ``experiments.run.training.train``. With an Optuna trial, the
trial's pruner is asked after every epoch but the last (optuna-integration's ``KerasPruningCallback``); a pruned
trial stops at that epoch's end and its run ends FINISHED, tagged ``tune.pruned=true``: it did what it was asked
(KILLED is for runs to resume, FAILED for runs that broke).
"""

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass

import keras
import mlflow
import optuna
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf
from optuna_integration.keras import KerasPruningCallback

from experiments.errors import ServerAway, UserError
from experiments.run.callbacks import EpochLogger
from experiments.run.data import Dataset, dataset_source, load_dataset, log_input
from experiments.run.distribute import describe, make_strategy, workers
from experiments.run.distribute import tags as strategy_tags
from experiments.run.lifecycle import tracked_run
from experiments.run.scratch_run import gradcheck_first_batch
from experiments.run.training import compiled_model, fit, model_summary, start_tags, timed, validate
from experiments.store.offline import Outbox
from experiments.store.tracking import flatten_config, local_run_dir, setup_experiment, shown_uri

MONITOR = "val_accuracy"  # what the pruner sees each epoch, and the trial's value


@dataclass
class Validated:
    """What a trial's run ends with: its validation metrics after its last epoch."""

    run_id: str
    experiment_id: str
    val_loss: float
    val_accuracy: float
    epochs: int  # trained; fewer than trainer.epochs when pruned
    pruned: bool


class PruneTrial(KerasPruningCallback):
    """optuna-integration's pruning callback (reports val_accuracy and asks the pruner), except that the step it
    reports is the number of epochs trained (1 to ``epochs``, the resource Hyperband counts; Keras's epoch index
    starts at 0), a pruned trial stops at the end of the epoch (``model.stop_training``) instead of raising in fit,
    so that its run ends as a run that did its job, and the last epoch is never pruned (nothing is left to save)."""

    def __init__(self, trial: optuna.Trial, epochs: int):
        super().__init__(trial, MONITOR)
        self.epochs, self.pruned_at = epochs, None

    def on_epoch_end(self, epoch, logs=None):
        try:
            super().on_epoch_end(epoch + 1, logs)
        except optuna.TrialPruned:
            if epoch + 1 < self.epochs:
                self.pruned_at = epoch + 1
                self.model.stop_training = True


class ExpectedRetracing(logging.Filter):
    """Every trial builds a new model, whose steps TensorFlow traces anew: its warning that a function "triggered
    tf.function retracing" too often says nothing in a process that trains trial after trial."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


RETRACING = ExpectedRetracing()


def without_test(data: Dataset) -> Dataset:
    """The dataset with an empty test split: a trial cannot look at it."""
    return dataclasses.replace(data, x_test=data.x_test[:0], y_test=data.y_test[:0])


def log_setup(cfg: DictConfig, model: keras.Model, data: Dataset) -> None:
    """A trial run's start: params, parameter count, model summary, config.yaml, and the training and validation
    splits as its dataset inputs."""
    mlflow.log_params(flatten_config(cfg))
    mlflow.log_metric("parameter_count", model.count_params())
    mlflow.log_text(model_summary(model), "model_summary.txt")
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    source = dataset_source(cfg.data)
    for split, context, x, y in [("train", "training", data.x_train, data.y_train),
                                 ("validation", "validation", data.x_val, data.y_val)]:
        with warnings.catch_warnings():  # as experiments.run.data.log_dataset_inputs
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            log_input(mlflow.data.from_numpy(x, targets=y, source=source, name=f"{cfg.data.name}-{split}"), context)


def train_and_validate(cfg: DictConfig, trial: optuna.Trial | None = None, parent_run_id: str | None = None,
                       tags: dict[str, str] | None = None, setup_started: float | None = None) -> Validated:
    """Train ``cfg`` (a train.py config) for its trainer.epochs and validate after each epoch, in one new MLflow run
    (a child of ``parent_run_id``, with ``tags`` beside a training run's); the test split is never evaluated or
    logged. ``trial``: the Optuna trial whose pruner may stop it early (the trial gets the run's id as its
    ``mlflow_run_id`` user attribute as soon as the run exists). A diverged loss raises ``Diverged`` (the run FAILED),
    an interrupt ``Interrupted`` (KILLED), as in ``train``."""
    setup_started = setup_started or time.time()
    validate(cfg)
    logging.getLogger("tensorflow").addFilter(RETRACING)  # once: a filter is added once
    strategy = make_strategy(cfg.trainer.get("strategy", "auto"))
    if workers(strategy) > 1:
        raise UserError("trainer.strategy multi_worker is not for tuning: start several tune.py processes on one "
                        "study instead (docs/tuning.md).")
    data = without_test(load_dataset(cfg.data))
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        model = compiled_model(cfg, data)
    experiment_id = setup_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    pruning = PruneTrial(trial, cfg.trainer.epochs) if trial is not None else None
    name = f"{cfg.model.name}-{cfg.data.name}" + (f"-trial{trial.number}" if trial is not None else "-validation")
    all_tags = {**start_tags(cfg, [], None), **strategy_tags(strategy), **(tags or {})}
    with tracked_run(experiment_id, name, all_tags, parent_run_id=parent_run_id) as run:
        run_id = run.info.run_id
        if trial is not None:
            trial.set_user_attr("mlflow_run_id", run_id)
        outbox = Outbox(run_id, mlflow.get_tracking_uri(), local_run_dir(cfg.tracking, "pending", run_id))
        log_setup(cfg, model, data)
        device = ("GPU" if tf.config.list_logical_devices("GPU") else "CPU") + describe(strategy)
        epochs = f"{cfg.trainer.epochs} epoch{'s' * (cfg.trainer.epochs != 1)}"
        print(f"{name} ({cfg.model.layers} layers): {len(data.x_train):,} train / {len(data.x_val):,} val images, "
              f"{epochs}, on {device} → run {run_id} in experiment {cfg.tracking.experiment}, "
              f"{shown_uri(mlflow.get_tracking_uri())}", flush=True)
        gradcheck_first_batch(cfg, model, data)  # scratch models: FAILED here if their math is wrong
        outbox.metrics({"setup_seconds": time.time() - setup_started})
        with timed(outbox, "fit_seconds", "train_seconds"):
            history = fit(model, cfg, data, 0, callbacks=[EpochLogger(len(data.x_train), outbox),
                                                          *([pruning] if pruning else [])])
        epochs = len(history.get(MONITOR, []))
        pruned = pruning is not None and pruning.pruned_at is not None
        val_loss, val_accuracy = history["val_loss"][-1], history[MONITOR][-1]
        if trial is not None:
            outbox.tag("tune.pruned", "true" if pruned else "false")
        if pruned:
            outbox.tag("tune.pruned_at_epoch", str(epochs))
        outbox.tag("mlflow.note.content", f"{name}: validation accuracy {100 * val_accuracy:.2f} % after {epochs} "
                                          f"of {cfg.trainer.epochs} epochs" + " (pruned)" * pruned)
        if not outbox.flush():
            raise ServerAway(outbox)
    return Validated(run_id, experiment_id, float(val_loss), float(val_accuracy), epochs, pruned)
