"""One training run: validate the config, load data, build, fit, evaluate, log everything to MLflow."""

import io
import sys
import time
from dataclasses import dataclass

import keras
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from experiments import UserError, plots
from experiments.data import load_dataset
from experiments.tracking import flatten_config, git_commit, setup_experiment, tracked_run
from models.architectures import build_model


@dataclass
class RunResult:
    run_id: str
    test_loss: float
    test_accuracy: float


def validate(cfg: DictConfig) -> None:
    """Reject settings that cannot train, naming the field and the value, before anything runs."""
    checks = [
        ("trainer.epochs", cfg.trainer.epochs, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        ("trainer.batch_size", cfg.trainer.batch_size, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        ("optimizer.learning_rate", cfg.optimizer.learning_rate,
         lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        ("optimizer.schedule", cfg.optimizer.schedule, lambda v: v in ("constant", "cosine"), "constant or cosine"),
        ("data.val_size", cfg.data.val_size, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ]
    for field, value, ok, expected in checks:
        if not ok(value):
            raise UserError(f"{field} must be {expected}, got {value!r}.")


def make_optimizer(cfg: DictConfig, total_steps: int) -> keras.optimizers.Optimizer:
    lr = cfg.learning_rate
    if cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total_steps)
    if cfg.name == "adam":
        return keras.optimizers.Adam(lr)
    if cfg.name == "sgd":
        return keras.optimizers.SGD(lr, momentum=cfg.momentum)
    raise UserError(f"optimizer.name must be adam or sgd, got {cfg.name!r}.")


class EpochLogger(keras.callbacks.Callback):
    """Logs each epoch's metrics to MLflow, with the training-pass time and throughput.

    ``epoch_seconds`` covers the training pass only (until the validation pass starts), so
    ``images_per_second`` is training throughput.
    """

    def __init__(self, num_images: int):
        super().__init__()
        self.num_images = num_images

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.train_seconds = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self.train_seconds is None:
            self.train_seconds = time.perf_counter() - self.start

    def on_epoch_end(self, epoch, logs=None):
        seconds = self.train_seconds or time.perf_counter() - self.start
        metrics = {k: float(v) for k, v in logs.items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics["epoch_seconds"] = seconds
        metrics["images_per_second"] = self.num_images / seconds
        mlflow.log_metrics(metrics, step=epoch + 1)


def model_summary(model: keras.Model) -> str:
    lines = io.StringIO()
    model.summary(print_fn=lambda line, **_: lines.write(line + "\n"))
    return lines.getvalue()


def log_figure(fig, name: str) -> None:
    mlflow.log_figure(fig, name)
    plots.plt.close(fig)


def train(cfg: DictConfig, overrides: list[str] = ()) -> RunResult:
    """Train and evaluate one configuration, logging it as one MLflow run."""
    validate(cfg)
    data = load_dataset(cfg.data)
    experiment_id = setup_experiment(cfg.tracking.uri, cfg.tracking.experiment)

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    steps_per_epoch = -(-len(data.x_train) // cfg.trainer.batch_size)
    model.compile(
        optimizer=make_optimizer(cfg.optimizer, cfg.trainer.epochs * steps_per_epoch),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,  # XLA was slower than plain graph mode for these small nets on CPU
    )

    tags = {
        "architecture": cfg.model.architecture,
        "model": cfg.model.name,
        "layers": cfg.model.layers,
        "dataset": cfg.data.name,
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    run_name = f"{cfg.model.name}-{cfg.data.name}-seed{cfg.seed}"
    with tracked_run(experiment_id, run_name, tags) as run:
        mlflow.log_params(flatten_config(cfg))
        mlflow.log_metric("parameter_count", model.count_params())
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        mlflow.log_text("\n".join(overrides) + "\n", "overrides.txt")
        mlflow.log_text(model_summary(model), "model_summary.txt")

        started = time.perf_counter()
        history = model.fit(
            data.x_train, data.y_train,
            batch_size=cfg.trainer.batch_size,
            epochs=cfg.trainer.epochs,
            validation_data=(data.x_val, data.y_val),
            callbacks=[EpochLogger(len(data.x_train))],
            verbose=1 if sys.stdout.isatty() else 2,
        ).history
        mlflow.log_metric("train_seconds", time.perf_counter() - started)

        test_loss, test_accuracy = model.evaluate(
            data.x_test, data.y_test, batch_size=1024, verbose=0
        )
        mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})

        probabilities = model.predict(data.x_test, batch_size=1024, verbose=0)
        log_figure(plots.training_curves(history), "plots/training_curves.png")
        log_figure(
            plots.confusion_matrix(data.y_test, np.argmax(probabilities, axis=1), data.class_names),
            "plots/confusion_matrix.png",
        )
        mlflow.keras.log_model(model, name="model")
    return RunResult(run.info.run_id, float(test_loss), float(test_accuracy))
