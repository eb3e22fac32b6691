"""One training run: validate the config, load data, build, fit, evaluate, log everything to MLflow."""

import contextlib
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from experiments import start_up_done
from experiments.analysis import plots
from experiments.config import check as check_config
from experiments.errors import ServerAway, UserError
from experiments.run.callbacks import EpochLogger, SetEpoch, StopOnInterrupt, StopOnNonFinite
from experiments.run.checkpoints import Checkpoints, Kept, checkpoint_dir, restore_run, resume_point, saved_metrics
from experiments.run.data import Augmentation, Dataset, TrainingBatches, batches, load_dataset, log_dataset_inputs
from experiments.run.distribute import describe, is_chief, make_strategy, steps_per_execution, task_name, workers
from experiments.run.distribute import tags as strategy_tags
from experiments.run.lifecycle import interrupts_kept, tracked_run
from experiments.run.scratch_run import gradcheck_first_batch, training_loss
from experiments.run.sweep import JOB_TAG, Sweep, job_identity
from experiments.store.offline import Outbox
from experiments.store.runs import PREDICTIONS_ARTIFACT, mark_dead_runs
from experiments.store.tracking import flatten_config, git_commit, local_run_dir, setup_experiment, shown_uri
from models.architectures import build_model, conv_feature_maps, conv_layers

EXAMPLES = 3  # test images logged with the model as its input example
# The batch of the validation and test passes: it divides the 5,000 validation and 10,000 test images of MNIST,
# Fashion-MNIST and CIFAR-10, so that every batch has one shape (a scratch model's compiled pieces are compiled
# once per shape: 1024 made two more, ~0.8 CPU-s of compiling per run).
EVAL_BATCH = 1000


@dataclass
class RunResult:
    run_id: str
    experiment_id: str
    test_loss: float
    test_accuracy: float


def validate(cfg: DictConfig) -> None:
    """Reject settings that cannot train, naming the field and the value, before anything runs."""
    check_config(cfg)


def learning_rate(cfg: DictConfig, steps_per_epoch: int, epochs: int) -> float | keras.optimizers.schedules.CosineDecay:
    """The ``optimizer`` group's learning rate: constant, or cosine decay to 0 at the last step; with
    ``warmup_epochs``, first a linear rise from 0 over that many epochs' steps (then the decay takes the rest)."""
    total = steps_per_epoch * epochs
    warmup = round(steps_per_epoch * (cfg.get("warmup_epochs") or 0))  # a run logged before the setting: none
    if warmup == 0:
        if cfg.schedule == "constant":
            return cfg.learning_rate
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=total)
    return keras.optimizers.schedules.CosineDecay(  # alpha = 1: no decay after the warm-up
        0.0, decay_steps=total - warmup, alpha=float(cfg.schedule == "constant"), warmup_target=cfg.learning_rate,
        warmup_steps=warmup)


def make_optimizer(cfg: DictConfig, steps_per_epoch: int, epochs: int) -> keras.optimizers.Optimizer:
    """The ``optimizer`` group's optimizer; ``weight_decay`` is Keras's decoupled decay (each step takes learning
    rate x weight_decay x weight from every weight), none at 0 (nor for a run logged before the setting existed)."""
    lr = learning_rate(cfg, steps_per_epoch, epochs)
    decay = cfg.get("weight_decay") or None
    if cfg.name == "adam":
        return keras.optimizers.Adam(lr, weight_decay=decay)
    return keras.optimizers.SGD(lr, momentum=cfg.momentum, weight_decay=decay)


def test_metrics(model: keras.Model, probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """What ``model.evaluate`` reports, from the one prediction pass the plots use too: the mean
    cross-entropy -log p[label] (p clipped to [eps, 1 - eps], as Keras does) plus the model's
    regularization losses, and the accuracy."""
    eps = keras.config.epsilon()
    p = np.clip(probabilities[np.arange(len(labels)), labels].astype(np.float64), eps, 1 - eps)
    penalty = sum(float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)
    return float(-np.mean(np.log(p))) + penalty, float(np.mean(np.argmax(probabilities, axis=1) == labels))


def model_summary(model: keras.Model) -> str:
    lines = io.StringIO()
    model.summary(print_fn=lambda line, **_: lines.write(line + "\n"))
    return lines.getvalue()


def log_plots(model: keras.Model, data, predictions: np.ndarray, history: dict[str, list[float]], outbox: Outbox,
              wrong_shown: int = 16) -> None:
    """The run's plots/: training curves, the confusion matrix, the first conv layer's filters, every conv layer's
    feature maps of the first test image, and misclassified test images with their predicted and true labels, and
    why the model said so for the first 4 of them (Grad-CAM and Integrated Gradients from the blank page,
    experiments/analysis/explain.py)."""
    from experiments.analysis.explain import mistakes_figure

    outbox.figure(plots.training_curves(history), "plots/training_curves.png")
    outbox.figure(plots.confusion_matrix(data.y_test, predictions, data.class_names), "plots/confusion_matrix.png")
    convs = conv_layers(model)
    if convs:
        kernel = keras.ops.convert_to_numpy(convs[0].kernel)
        outbox.figure(plots.conv_filters(kernel, convs[0].name), "plots/first_conv_filters.png")
        label = data.class_names[data.y_test[0]]
        views = conv_feature_maps(model, data.x_test[0])
        outbox.figure(plots.feature_maps(data.x_test[0], views, label), "plots/feature_maps.png")
    wrong = np.flatnonzero(predictions != data.y_test)[:wrong_shown]
    if len(wrong):
        outbox.figure(plots.misclassified(data.x_test[wrong], data.y_test[wrong], predictions[wrong], data.class_names),
                   "plots/misclassified.png")
        few = wrong[:4]  # the blank page: a 0-intensity pixel, normalised, is each channel's lowest value
        outbox.figure(mistakes_figure(model, data.x_test[few], data.y_test[few], predictions[few], data.class_names,
                                      baseline=data.x_test.min(axis=(0, 1, 2))), "plots/explanations.png")


def predictions_file(folder: Path, labels: np.ndarray, probabilities: np.ndarray) -> Path:
    """``test_predictions.npz`` in ``folder``: the test set's labels, predicted classes and class probabilities, so
    runs can be compared image by image (compare.py's McNemar test, ``experiments.store.runs``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PREDICTIONS_ARTIFACT
    np.savez_compressed(path, y_true=labels.astype(np.int64), y_pred=np.argmax(probabilities, axis=1).astype(np.int64),
                        probabilities=probabilities.astype(np.float32))
    return path


def headline(cfg: DictConfig, data: Dataset, run_id: str, first_epoch: int | None, xla: bool,
             strategy: tf.distribute.Strategy) -> str:
    """The run's first console line: what is trained on what, on which devices, and where it is logged;
    ``first_epoch``: the epochs a resumed run had done, None for a new run."""
    device = (("GPU" if tf.config.list_logical_devices("GPU") else "CPU") + describe(strategy)
              + (" with XLA" if xla else ""))
    run = (f"run {run_id}" if first_epoch is None
           else f"resuming run {run_id} after epoch {first_epoch} of {cfg.trainer.epochs}")
    return (f"{cfg.model.name} ({cfg.model.layers} layers) on {cfg.data.name}: {len(data.x_train):,} train / "
            f"{len(data.x_val):,} val / {len(data.x_test):,} test images, on {device} → {run} in experiment "
            f"{cfg.tracking.experiment}, {shown_uri(mlflow.get_tracking_uri())}")


@contextlib.contextmanager
def timed(outbox: Outbox, *metrics: str):
    """Logs the wall seconds the block took as each of ``metrics`` (not when it raises)."""
    started = time.perf_counter()
    yield
    outbox.metrics(dict.fromkeys(metrics, time.perf_counter() - started))


def description(cfg: DictConfig, data: Dataset, test_accuracy: float) -> str:
    """The run's one-line description in the MLflow UI."""
    return (f"{cfg.model.name} ({cfg.model.layers} layers) on {cfg.data.name}, {len(data.x_train):,} training images, "
            f"{cfg.trainer.epochs} epochs: test accuracy {100 * test_accuracy:.2f} %")


def start_tags(cfg: DictConfig, overrides: list[str], sweep: Sweep | None) -> dict[str, str]:
    """A new run's tags; a sweep job's carry its sweep and its identity (to be found on resume)."""
    tags = {"architecture": cfg.model.architecture, "model": cfg.model.name, "layers": cfg.model.layers,
            "dataset": cfg.data.name}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    if sweep:
        tags["sweep_id"] = sweep.sweep_id
        tags[JOB_TAG] = job_identity(overrides)
    if cfg.get("hparams") is not None:  # hparams=tuned: the study and trial its setting comes from
        from experiments.store.studies import tuned_tags

        tags.update(tuned_tags(cfg))
    return tags


def full_history(run_id: str, history: dict[str, list[float]], first_epoch: int) -> dict[str, list[float]]:
    """The per-epoch metrics of the whole run: what earlier processes logged, then this fit's."""
    if first_epoch == 0:
        return history
    client = mlflow.MlflowClient()
    earlier = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in history}
    return {key: [earlier[key].get(epoch, float("nan")) for epoch in range(1, first_epoch + 1)] + values
            for key, values in history.items()}


def compiled_model(cfg: DictConfig, data: Dataset) -> keras.Model:
    """The configured model, compiled for training (its variables live in the strategy whose scope
    the caller is in; under a tf.distribute strategy, one step per execution: see ``steps_per_execution``)."""
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    steps_per_epoch = -(-len(data.x_train) // cfg.trainer.batch_size)
    model.compile(
        optimizer=make_optimizer(cfg.optimizer, steps_per_epoch, cfg.trainer.epochs),
        loss=training_loss(cfg.model),
        metrics=["accuracy"],
        jit_compile=cfg.trainer.get("xla", False),  # a run logged before the setting existed: off
        steps_per_execution=steps_per_execution(cfg.trainer.steps_per_execution),
    )
    return model


def fit(model: keras.Model, cfg: DictConfig, data: Dataset, first_epoch: int,
        callbacks: list[keras.callbacks.Callback]) -> dict[str, list[float]]:
    """Train from ``first_epoch`` to ``trainer.epochs`` on batches whose order and shifts depend on the
    seed and the epoch only; the per-epoch history (empty when no epoch is left).

    A Ctrl-C or a signal of ``lifecycle.INTERRUPTS`` stops training at the end of a batch, raised once fit returns
    (``interrupts_kept``, ``StopOnInterrupt``); among several workers, at once: they train in lockstep, and one that
    stopped at its batch's end would leave the others waiting for its next step."""
    start_up_done()  # the garbage collector on again, without what the start-up made
    if first_epoch >= cfg.trainer.epochs:
        return {}
    training = TrainingBatches(data.x_train, data.y_train, cfg.trainer.batch_size, cfg.seed, Augmentation.of(cfg.data))
    interrupts = interrupts_kept() if workers(model.distribute_strategy) == 1 else contextlib.nullcontext()
    with interrupts:
        return model.fit(
            training.dataset,
            epochs=cfg.trainer.epochs,
            initial_epoch=first_epoch,
            shuffle=False,  # the batches come shuffled (TrainingBatches)
            validation_data=batches(data.x_val, data.y_val, EVAL_BATCH),
            callbacks=[SetEpoch(training), StopOnNonFinite(), *callbacks, StopOnInterrupt()],  # the stop: last
            verbose=1 if sys.stdout.isatty() else 2,
        ).history


def local_copy(model: keras.Model, cfg: DictConfig, data: Dataset) -> keras.Model:
    """The trained model outside its strategy, to evaluate and log in this process alone (under
    multi_worker, the strategy's own predict is a step of all workers)."""
    copy = compiled_model(cfg, data)
    copy.set_weights(model.get_weights())
    return copy


def log_setup(cfg: DictConfig, model: keras.Model, data: Dataset, logged=None) -> None:
    """What a run logs at its start: params, parameter count, model summary, dataset inputs. ``logged``: the data
    (``mlflow.entities.RunData``) of a resumed run that starts again from epoch 0, which logs what its first start
    did not get to (MLflow refuses a param logged again with another value, e.g. trainer.epochs grown: the first
    one stays, as for any resumed run; it links a dataset to a run once)."""
    params = flatten_config(cfg)
    if logged is not None:
        params = {key: value for key, value in params.items() if key not in logged.params}
    mlflow.log_params(params)
    if logged is None or "parameter_count" not in logged.metrics:
        mlflow.log_metric("parameter_count", model.count_params())
    mlflow.log_text(model_summary(model), "model_summary.txt")
    log_dataset_inputs(cfg.data, data)


def train_as_worker(cfg: DictConfig, model: keras.Model, data: Dataset, strategy: tf.distribute.Strategy) -> None:
    """A non-chief worker of a multi-worker run: it trains in step with the chief, which logs the run."""
    print(f"{task_name(strategy)} of {workers(strategy)} workers: training with the chief, which logs the run",
          flush=True)
    fit(model, cfg, data, 0, callbacks=[])


def train(cfg: DictConfig, overrides: list[str] = (), sweep: Sweep | None = None,
          resume_run_id: str | None = None, setup_started: float | None = None) -> RunResult | None:
    """Train and evaluate one configuration, logging it as one MLflow run (a child of the sweep's
    parent run when it is one job of a sweep). With ``resume_run_id``, continue that run from its
    checkpoint: same run, metric history continued, the remaining epochs only; from epoch 0 when it stopped
    before its first checkpoint. A resume that is refused (``experiments.run.checkpoints.resume_point``) leaves
    the run as it was.

    ``trainer.keep=best`` evaluates, logs and returns the model at the epoch of the highest validation accuracy (the
    metric ``kept_epoch``) instead of the last.

    ``trainer.strategy`` says on which devices (``experiments.run.distribute``); of a multi-worker run only the
    chief logs, and the other workers return None.

    The run logs where its time went: ``setup_seconds`` from ``setup_started`` (``time.time()``; default:
    this call) to the start of training, ``fit_seconds`` (also as ``train_seconds``), ``evaluate_seconds``
    (test metrics and predictions) and ``logging_seconds`` (plots, model)."""
    setup_started = setup_started or time.time()
    validate(cfg)
    strategy = make_strategy(cfg.trainer.get("strategy", "auto"))  # first: before TensorFlow runs anything
    if resume_run_id and workers(strategy) > 1:
        raise UserError(f"resume={resume_run_id} continues a run in one process: run it without TF_CONFIG and "
                        "outside srun (one worker).")
    data = load_dataset(cfg.data)
    keras.utils.set_random_seed(cfg.seed)
    with strategy.scope():
        model = compiled_model(cfg, data)
    if not is_chief(strategy):
        return train_as_worker(cfg, model, data, strategy)
    experiment_id = setup_experiment(cfg.tracking.uri, cfg.tracking.experiment)
    mark_dead_runs(mlflow.MlflowClient(), [experiment_id])
    first_epoch, resumed = 0, None
    if resume_run_id:  # before the run is taken up again: a refusal leaves it as it was
        resumed = resume_point(Checkpoints(checkpoint_dir(cfg.tracking, resume_run_id)), resume_run_id)
        if resumed.path is not None:
            with strategy.scope():  # the optimizer's variables, built here, belong to the strategy
                first_epoch = restore_run(model, resume_run_id, resumed.path)

    run_name = f"{cfg.model.name}-{cfg.data.name}-seed{cfg.seed}"
    tags = {**start_tags(cfg, overrides, sweep), **strategy_tags(strategy)}
    with tracked_run(experiment_id, run_name, tags, parent_run_id=sweep and sweep.parent_run_id,
                     run_id=resume_run_id) as run:
        run_id = run.info.run_id
        checkpoints = Checkpoints(checkpoint_dir(cfg.tracking, run_id))
        outbox = Outbox(run_id, mlflow.get_tracking_uri(), local_run_dir(cfg.tracking, "pending", run_id))
        if resume_run_id:
            mlflow.set_tag("resumed_from_epoch", str(first_epoch))
        if first_epoch == 0:  # a new run, or a resumed one that stopped before its first checkpoint
            log_setup(cfg, model, data, mlflow.MlflowClient().get_run(run_id).data if resume_run_id else None)
        elif first_epoch > resumed.epochs_logged and (metrics := saved_metrics(resumed.path)):
            outbox.metrics(metrics, step=first_epoch)  # killed between the epoch's checkpoint and its metrics
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        mlflow.log_text("\n".join(overrides) + "\n", "overrides.txt")
        print(headline(cfg, data, run_id, first_epoch if resume_run_id else None, model.jit_compile, strategy),
              flush=True)
        if first_epoch == 0:
            gradcheck_first_batch(cfg, model, data)  # scratch models: FAILED here if their math is wrong
        outbox.metrics({"setup_seconds": time.time() - setup_started})

        kept = Kept.read(resumed and resumed.path) if cfg.trainer.get("keep") == "best" else None
        with timed(outbox, "fit_seconds", "train_seconds"):
            history = fit(model, cfg, data, first_epoch,
                          callbacks=[EpochLogger(len(data.x_train), outbox, checkpoints, kept)])

        if strategy is not tf.distribute.get_strategy():  # trained on a tf.distribute strategy's replicas
            model = local_copy(model, cfg, data)
        if kept is not None:  # trainer.keep=best: the epoch chosen on the validation set
            model.set_weights(kept.weights)
            outbox.metrics({"kept_epoch": kept.epoch})
        with timed(outbox, "evaluate_seconds"):
            probabilities = model.predict(data.x_test, batch_size=EVAL_BATCH, verbose=0)
            test_loss, test_accuracy = test_metrics(model, probabilities, data.y_test)
        outbox.metrics({"test_loss": test_loss, "test_accuracy": test_accuracy})

        predictions = np.argmax(probabilities, axis=1)
        with timed(outbox, "logging_seconds"):
            if cfg.trainer.get("plots", True):  # runs logged before trainer.plots had them all
                log_plots(model, data, predictions, full_history(run_id, history, first_epoch), outbox)
            outbox.artifact(predictions_file(outbox.folder / "files", data.y_test, probabilities), "")
            outbox.model(model, cfg, data.x_test[:EXAMPLES], probabilities[:EXAMPLES])
            outbox.tag("mlflow.note.content", description(cfg, data, test_accuracy))
        if not outbox.flush():
            raise ServerAway(outbox)
    return RunResult(run_id, experiment_id, float(test_loss), float(test_accuracy))
