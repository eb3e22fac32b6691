"""End-to-end runs of train.py against a temporary MLflow store, and the failure paths."""

import re
import signal
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from experiments import PROJECT_ROOT
from experiments.run.training import train
from tests.conftest import TINY, compose_train, run_train


def only_run(uri, experiment="lenet-lab"):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real `python train.py` on 3000 images, 2 epochs, run from an unrelated directory."""
    tmp_path = tmp_path_factory.mktemp("tiny_run")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    result = run_train([*TINY, f"tracking.uri={uri}", "seed=3"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return uri, result, tmp_path


def test_run_prints_its_id_and_test_metrics(tiny_run):
    uri, result, _ = tiny_run
    _, run = only_run(uri)
    assert f"MLflow run id: {run.info.run_id}" in result.stdout
    printed = re.search(r"test_loss=([\d.]+) test_accuracy=([\d.]+)", result.stdout)
    assert float(printed[2]) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-4)
    # Not a terminal: one line per epoch, no progress bar.
    assert len(re.findall(r"^\d+/\d+ - \d+s", result.stdout, re.M)) == 2


def test_run_logs_params_metrics_tags_and_finishes(tiny_run):
    uri, _, _ = tiny_run
    client, run = only_run(uri)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "lenet" and params["trainer.epochs"] == "2"
    assert params["data.train_size"] == "3000" and params["seed"] == "3"
    assert params["optimizer.learning_rate"] == "0.001"
    assert run.data.tags["architecture"] == "lenet" and run.data.tags["dataset"] == "mnist"
    assert run.data.tags["layers"] == "builtin"
    metrics = run.data.metrics
    assert metrics["parameter_count"] == 44_426
    assert metrics["test_accuracy"] > 0.6  # chance is 0.1
    assert metrics["train_seconds"] > 0
    for name in ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds",
                 "images_per_second", "images_per_cpu_second"]:
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    lr = [m.value for m in client.get_metric_history(run.info.run_id, "learning_rate")]
    assert lr[0] > lr[1]  # cosine schedule


def test_run_logs_artifacts_and_a_loadable_model(tiny_run):
    uri, _, tmp_path = tiny_run
    client, run = only_run(uri)
    run_id = run.info.run_id
    mlflow.set_tracking_uri(uri)
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "overrides.txt", "model_summary.txt", "plots", "test_predictions.npz"} <= names
    with np.load(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/test_predictions.npz")) as saved:
        y_true, y_pred, probabilities = saved["y_true"], saved["y_pred"], saved["probabilities"]
    assert y_true.shape == y_pred.shape == (1000,) and probabilities.shape == (1000, 10)
    assert np.mean(y_pred == y_true) == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6)
    np.testing.assert_array_equal(y_pred, probabilities.argmax(axis=1))
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {f"plots/{name}.png" for name in ["training_curves", "confusion_matrix", "first_conv_filters",
                                                      "feature_maps", "misclassified", "explanations"]}
    config = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    assert "train_size: 3000" in config
    assert "seed=3" in mlflow.artifacts.load_text(f"runs:/{run_id}/overrides.txt")
    # Artifacts sit beside the database, not in the directory train.py was started from.
    assert run.info.artifact_uri.startswith((tmp_path / "store" / "mlruns").as_uri())
    assert not (tmp_path / "mlruns").exists()

    model = mlflow.keras.load_model(f"runs:/{run_id}/model")
    assert isinstance(model, keras.Model) and model.count_params() == 44_426


def sweep_runs(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    assert len(parents) == 1
    return parents[0], [r for r in runs if r is not parents[0]]


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["sequential", "joblib-2-parallel"])
def test_multirun_logs_one_child_run_per_job_under_one_parent(tmp_path, tracking_uri, launcher):
    """Parallel jobs on a fresh store: no run lost or half-logged, all grouped under the sweep."""
    result = run_train(["-m", *launcher, "model=lenet,simple_conv", "debug=tiny",
                        "trainer.plots=true", f"tracking.uri={tracking_uri}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = sweep_runs(tracking_uri)
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["model.name"] for r in children) == ["lenet", "simple_conv"]
    client = MlflowClient(tracking_uri)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["sweep_id"] == parent.data.tags["sweep_id"]
        assert {"test_accuracy", "test_loss", "parameter_count", "val_accuracy"} <= set(run.data.metrics)
        assert len(run.data.params) == len(children[0].data.params)
        assert len(client.list_artifacts(run.info.run_id, "plots")) == 6
        assert len(run.outputs.model_outputs) == 1  # the logged Keras model


def test_a_sweep_with_a_failing_job_marks_its_parent_run_failed(tmp_path, store_uri):
    result = run_train(["-m", "debug=tiny", "trainer.epochs=1,0", f"tracking.uri={store_uri}"], tmp_path)
    assert result.returncode == 2
    assert "error: trainer.epochs must be an integer >= 1, got 0." in result.stderr
    parent, children = sweep_runs(store_uri)
    assert parent.info.status == "FAILED"
    assert [r.info.status for r in children] == ["FINISHED"]


def test_a_sweep_whose_job_config_cannot_be_composed_marks_its_parent_run_failed(tmp_path, store_uri):
    """Hydra composes each job's config when it launches it: a mistyped swept value stops the sweep there,
    before any job runs and without a job to say so; the parent run must not stay RUNNING."""
    result = run_train(["-m", "seed=abc,1", f"tracking.uri={store_uri}"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: seed must be an integer in [0, 4294967295], got 'abc'."
    parent, children = sweep_runs(store_uri)
    assert parent.info.status == "FAILED" and children == []


def tiny_cfg(store_uri, *extra):
    return compose_train(["data.train_size=500", "data.test_size=200", "trainer.epochs=2",
                          f"tracking.uri={store_uri}", *extra])


def trained_state(uri: str, run_id: str) -> tuple[list[np.ndarray], dict[str, list[float]]]:
    """The run's final weights and optimizer state (its logged checkpoint) and its metric histories."""
    client = MlflowClient(uri)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="checkpoint/checkpoint.npz",
                                               tracking_uri=uri)
    with np.load(path) as saved:
        arrays = [saved[name] for name in sorted(saved.files)]
    metrics = client.get_run(run_id).data.metrics
    return arrays, {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
                    for key in metrics}


def test_same_seed_same_run(store_uri):
    runs = [train(tiny_cfg(store_uri, f"seed={seed}", "trainer.plots=false")).run_id for seed in (7, 7, 8)]
    first, second, other = (trained_state(store_uri, run_id) for run_id in runs)
    names = {a.path for a in MlflowClient(store_uri).list_artifacts(runs[0])}  # trainer.plots=false: all but plots/
    assert {"config.yaml", "model_summary.txt", "test_predictions.npz", "checkpoint"} <= names and "plots" not in names
    assert len(first[0]) > 10 and set(first[1]) == set(second[1]) and "val_accuracy" in first[1]
    for a, b in zip(first[0], second[0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(first[1][key], second[1][key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert abs(first[1]["test_loss"][0] - other[1]["test_loss"][0]) > 1e-6
    assert not all(np.allclose(a, b) for a, b in zip(first[0], other[0], strict=True))


@pytest.mark.parametrize("error, status", [(RuntimeError("disk on fire"), "FAILED"),
                                           (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_stops_is_marked_and_keeps_what_it_logged(store_uri, monkeypatch, error, status):
    def explode(*args, **kwargs):
        raise error

    monkeypatch.setattr("experiments.analysis.plots.confusion_matrix", explode)  # after training and testing
    with pytest.raises(type(error)):
        train(tiny_cfg(store_uri))
    client, run = only_run(store_uri)
    assert run.info.status == status
    assert run.data.params["model.name"] == "lenet"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
    assert "test_accuracy" in run.data.metrics
    if status == "FAILED":
        assert run.data.tags["error"] == "RuntimeError: disk on fire"
        traceback = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/error.txt")
        assert "disk on fire" in traceback


@pytest.mark.slow
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_train_py_is_marked_killed_keeps_its_epochs_and_says_how_to_resume(tmp_path, store_uri,
                                                                                           signum, exit_code):
    """A real signal mid-training: SIGTERM as a job scheduler or `kill` sends, SIGINT as Ctrl-C does."""
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=tiny", "trainer.epochs=200",
           f"tracking.uri={store_uri}", f"hydra.run.dir={tmp_path}/hydra"]
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # one line per epoch; "Epoch 3/200" once two epochs are logged
            if line.startswith("Epoch 3/"):
                break
        process.send_signal(signum)
        stderr = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == exit_code, stderr[-2000:]
    client, run = only_run(store_uri)
    run_id = run.info.run_id
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted: run {run_id} marked KILLED; resume with python train.py resume={run_id}")
    assert "Traceback" not in stderr
    assert run.info.status == "KILLED"
    assert run.data.tags["error"] == f"interrupted (signal {signal.Signals(signum).name})"
    assert len(client.get_metric_history(run_id, "loss")) >= 2


@pytest.mark.parametrize("regularized", [False, True], ids=["plain", "l2"])
def test_test_metrics_from_one_prediction_pass_equal_model_evaluate(regularized):
    from experiments.run.training import test_metrics

    keras.utils.set_random_seed(0)
    regularizer = keras.regularizers.L2(0.01) if regularized else None
    model = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(8, activation="relu", kernel_regularizer=regularizer),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(1).normal(size=(300, 6)).astype("float32") * 3
    y = np.random.default_rng(2).integers(0, 3, 300)
    loss, accuracy = test_metrics(model, model.predict(x, verbose=0), y)
    expected_loss, expected_accuracy = model.evaluate(x, y, batch_size=64, verbose=0)
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert accuracy == pytest.approx(expected_accuracy, abs=1e-7)
    assert 0.2 < accuracy < 0.8  # an untrained model: some right, some wrong
