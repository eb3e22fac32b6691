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
from experiments.data import Dataset, batches, load_dataset, log_dataset_inputs
from experiments.models_store import log_model
from experiments.sweep import Sweep
from experiments.tracking import flatten_config, git_commit, setup_experiment, tracked_run
from models.architectures import ARCHITECTURES, build_model

EXAMPLES = 3  # test images logged with the model as its input example


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
        ("trainer.steps_per_execution", cfg.trainer.steps_per_execution,
         lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        ("optimizer.learning_rate", cfg.optimizer.learning_rate,
         lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
        ("optimizer.name", cfg.optimizer.name, lambda v: v in ("adam", "sgd"), "adam or sgd"),
        ("optimizer.schedule", cfg.optimizer.schedule, lambda v: v in ("constant", "cosine"), "constant or cosine"),
        ("model.architecture", cfg.model.architecture, lambda v: v in ARCHITECTURES, f"one of {sorted(ARCHITECTURES)}"),
        ("model.layers", cfg.model.layers, lambda v: v in ("builtin", "scratch"), "builtin or scratch"),
        ("data.val_size", cfg.data.val_size, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        ("data.max_shift", cfg.data.max_shift, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
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
    return keras.optimizers.SGD(lr, momentum=cfg.momentum)


class EpochTimer(keras.callbacks.Callback):
    """Wall and CPU seconds of each epoch's training pass (up to the start of the validation pass).

    CPU seconds (all threads of the process) are the steadier measure on a shared machine.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.cpu_start, self.seconds = time.perf_counter(), time.process_time(), None

    def stop_clock(self):
        if self.seconds is None:  # the first call of the epoch counts
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start

    def on_test_begin(self, logs=None):
        self.stop_clock()

    def on_epoch_end(self, epoch, logs=None):
        self.stop_clock()  # an epoch without validation pass


class EpochLogger(EpochTimer):
    """Logs each epoch's metrics, learning rate, training-pass time and throughput to MLflow."""

    def __init__(self, num_images: int):
        super().__init__()
        self.num_images = num_images

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        metrics = {k: float(v) for k, v in logs.items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics["epoch_seconds"] = self.seconds
        metrics["images_per_second"] = self.num_images / self.seconds
        metrics["images_per_cpu_second"] = self.num_images / self.cpu_seconds
        mlflow.log_metrics(metrics, step=epoch + 1)


def model_summary(model: keras.Model) -> str:
    lines = io.StringIO()
    model.summary(print_fn=lambda line, **_: lines.write(line + "\n"))
    return lines.getvalue()


def log_figure(fig, name: str) -> None:
    mlflow.log_figure(fig, name)
    plots.plt.close(fig)


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers with a 4-D kernel (kh, kw, in, out): the builtin and the scratch convolutions."""
    return [layer for layer in model.layers if len(getattr(layer, "kernel", np.empty(0)).shape) == 4]


def log_inside_views(model: keras.Model, data, predictions: np.ndarray, wrong_shown: int = 16) -> None:
    """First conv layer's filters, every conv layer's feature maps of the first test image, and
    misclassified test images with their predicted and true labels."""
    convs = conv_layers(model)
    if convs:
        kernel = keras.ops.convert_to_numpy(convs[0].kernel)
        log_figure(plots.conv_filters(kernel, convs[0].name), "plots/first_conv_filters.png")
        probe = keras.Model(model.inputs, [layer.output for layer in convs])
        maps = probe.predict(data.x_test[:1], verbose=0)
        maps = maps if isinstance(maps, list) else [maps]
        label = data.class_names[data.y_test[0]]
        views = {layer.name: m[0] for layer, m in zip(convs, maps, strict=True)}
        log_figure(plots.feature_maps(data.x_test[0], views, label), "plots/feature_maps.png")
    wrong = np.flatnonzero(predictions != data.y_test)[:wrong_shown]
    if len(wrong):
        log_figure(plots.misclassified(data.x_test[wrong], data.y_test[wrong], predictions[wrong], data.class_names),
                   "plots/misclassified.png")


def description(cfg: DictConfig, data: Dataset, test_accuracy: float) -> str:
    """The run's one-line description in the MLflow UI."""
    return (f"{cfg.model.name} ({cfg.model.layers} layers) on {cfg.data.name}, {len(data.x_train):,} training images, "
            f"{cfg.trainer.epochs} epochs: test accuracy {100 * test_accuracy:.2f} %")


def train(cfg: DictConfig, overrides: list[str] = (), sweep: Sweep | None = None) -> RunResult:
    """Train and evaluate one configuration, logging it as one MLflow run (a child of the sweep's
    parent run when it is one job of a sweep)."""
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
        jit_compile=False,  # XLA did not pay off for these small nets on CPU (benchmarks/)
        steps_per_execution=cfg.trainer.steps_per_execution,
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
    if sweep:
        tags["sweep_id"] = sweep.sweep_id
    run_name = f"{cfg.model.name}-{cfg.data.name}-seed{cfg.seed}"
    with tracked_run(experiment_id, run_name, tags, parent_run_id=sweep and sweep.parent_run_id) as run:
        mlflow.log_params(flatten_config(cfg))
        mlflow.log_metric("parameter_count", model.count_params())
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        mlflow.log_text("\n".join(overrides) + "\n", "overrides.txt")
        mlflow.log_text(model_summary(model), "model_summary.txt")
        log_dataset_inputs(cfg.data, data)

        started = time.perf_counter()
        history = model.fit(
            batches(data.x_train, data.y_train, cfg.trainer.batch_size, shuffle_seed=cfg.seed,
                    max_shift=cfg.data.max_shift),
            epochs=cfg.trainer.epochs,
            shuffle=False,  # the pipeline shuffles, seeded
            validation_data=batches(data.x_val, data.y_val, 1024),
            callbacks=[EpochLogger(len(data.x_train))],
            verbose=1 if sys.stdout.isatty() else 2,
        ).history
        mlflow.log_metric("train_seconds", time.perf_counter() - started)

        test_loss, test_accuracy = model.evaluate(
            data.x_test, data.y_test, batch_size=1024, verbose=0
        )
        mlflow.log_metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})

        probabilities = model.predict(data.x_test, batch_size=1024, verbose=0)
        predictions = np.argmax(probabilities, axis=1)
        log_figure(plots.training_curves(history), "plots/training_curves.png")
        log_figure(plots.confusion_matrix(data.y_test, predictions, data.class_names), "plots/confusion_matrix.png")
        log_inside_views(model, data, predictions)
        log_model(model, cfg, data.x_test[:EXAMPLES], probabilities[:EXAMPLES])
        mlflow.set_tag("mlflow.note.content", description(cfg, data, test_accuracy))
    return RunResult(run.info.run_id, float(test_loss), float(test_accuracy))
