"""The Model Registry behind ``compare.py register=true``, on runs with real (tiny) logged Keras models."""

import shutil
import time

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from experiments.apps.compare import compare
from experiments.errors import UserError
from experiments.store.registry import (
    MOVED,
    NEW,
    SKIPPED,
    UNCHANGED,
    champion_uri,
    champion_version,
    register_champions,
    registered_model_name,
)
from experiments.store.runs import load_runs
from experiments.store.tracking import setup_experiment, sqlite_path
from tests.test_compare import EXPERIMENT, log_run, run_compare

FIRST = "tags.batch = 'first'"  # the runs trained before the better ones appeared
RUNS = {  # name: model, seed, val_accuracy per epoch, test_accuracy, batch, minutes after the first run, logs a model
    # the first batch's lenet champion: best final val_accuracy of its runs with a model
    "lenet-0": ("lenet", 0, [0.950, 0.985], 0.980, "first", 0, True),
    # the best test accuracy and the best val_accuracy of any epoch, but not of the last one
    "lenet-1": ("lenet", 1, [0.990, 0.980], 0.995, "first", 1, True),
    # the best final val_accuracy of the first batch, but its model was never logged
    "lenet-2": ("lenet", 2, [0.970, 0.990], 0.985, "first", 2, False),
    # equal final val_accuracy: the later run is the champion
    "scratch-0": ("lenet_scratch", 0, [0.960, 0.975], 0.980, "first", 3, True),
    "scratch-1": ("lenet_scratch", 1, [0.965, 0.975], 0.981, "first", 4, True),
    # later: the best lenet run, then a rerun of its seed that the table keeps instead (one seed counts once)
    "lenet-3-old": ("lenet", 3, [0.980, 0.995], 0.990, "later", 10, True),
    "lenet-3-new": ("lenet", 3, [0.970, 0.982], 0.991, "later", 11, True),
}


def tiny_model() -> keras.Model:
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                             keras.layers.Dense(10, activation="softmax")])


@pytest.fixture(scope="module")
def template(tmp_path_factory, empty_db):
    """A store with the RUNS, their models really logged (once per module: about a second per model).

    Tests work on copies of its database; the models' files stay here, read only."""
    db = tmp_path_factory.mktemp("registry_store") / "mlflow.db"
    shutil.copy(empty_db, db)
    uri = f"sqlite:///{db}"
    client = MlflowClient(uri)
    experiment_id = setup_experiment(uri, EXPERIMENT)  # also the global tracking URI, for mlflow.keras.log_model
    model, start = tiny_model(), int(time.time() * 1000) - 3_600_000
    ids = {}
    for name, (architecture, seed, val_accuracy, test_accuracy, batch, minutes, logs_model) in RUNS.items():
        run_id = log_run(client, experiment_id, architecture, seed, test_accuracy=test_accuracy, test_loss=0.05,
                         val_accuracy=val_accuracy, epoch_seconds=[1.0, 1.0], images_per_second=[1000, 1000],
                         status="RUNNING", start_time=start + 60_000 * minutes)
        client.set_tag(run_id, "batch", batch)
        if logs_model:
            with mlflow.start_run(run_id=run_id):
                mlflow.keras.log_model(model, name="model", pip_requirements=[f"keras=={keras.__version__}"])
        client.set_terminated(run_id, "FINISHED")
        ids[name] = run_id
    return db, ids


@pytest.fixture
def store(template, tracking_uri):
    """A fresh copy of the template store: nothing registered yet."""
    db, ids = template
    shutil.copy(db, sqlite_path(tracking_uri))
    return tracking_uri, MlflowClient(tracking_uri), ids


def versions(client, model) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{registered_model_name(model)}'"))


def by_model(registrations) -> dict:
    return {registration.model: registration for registration in registrations}


def test_first_registration_picks_the_best_final_val_accuracy_never_test_accuracy(store, tmp_path):
    uri, client, ids = store
    comparison = compare(uri, EXPERIMENT, None, FIRST, tmp_path, register=True)
    lenet, scratch = by_model(comparison.registrations).values()
    assert (lenet.status, lenet.version, lenet.run_id, lenet.val_accuracy) == (NEW, "1", ids["lenet-0"], 0.985)
    assert lenet.without_model == (ids["lenet-2"],)
    assert (scratch.status, scratch.version, scratch.run_id) == (NEW, "1", ids["scratch-1"])  # the later of a tie

    champion = champion_version(client, "lenet")
    assert (champion.name, str(champion.version), champion.run_id) == ("lenet-lab-lenet", "1", ids["lenet-0"])
    assert champion.aliases == ["champion"]
    assert champion.tags == {"run_id": ids["lenet-0"], "val_accuracy": "0.985", "model": "lenet",
                             "layers": "builtin", "dataset": "mnist", "seed": "0"}
    assert champion_uri(client, "lenet") == "models:/lenet-lab-lenet@champion"

    assert comparison.markdown.endswith(
        "## Registered\n\n"
        "| Architecture  | Registered model        | Version | Alias    | Run                              "
        "| Dataset | Val accuracy (%) | Status |\n"
        "|---------------|-------------------------|--------:|----------|----------------------------------"
        "|---------|-----------------:|--------|\n"
        f"| lenet         | lenet-lab-lenet         |       1 | champion | {ids['lenet-0']} "
        "| mnist   |            98.50 | new    |\n"
        f"| lenet_scratch | lenet-lab-lenet_scratch |       1 | champion | {ids['scratch-1']} "
        "| mnist   |            97.50 | new    |\n\n"
        "Champion: the run with the best final validation accuracy (never test accuracy), as "
        "`models:/<registered model>@champion`; a new version only for a run better than the champion.\n\n"
        f"Not registered, no logged model: {ids['lenet-2']} (lenet).\n")
    assert (tmp_path / "comparison.md").read_text() == comparison.markdown


def test_a_better_run_moves_the_alias_and_registering_again_changes_nothing(store, tmp_path):
    uri, client, ids = store
    compare(uri, EXPERIMENT, None, FIRST, tmp_path, register=True)
    moved = compare(uri, EXPERIMENT, None, None, tmp_path, register=True)
    lenet, scratch = by_model(moved.registrations).values()
    # the best run is a duplicate seed the table drops for its rerun: the registry still takes it
    assert (lenet.status, lenet.version, lenet.previous_version, lenet.run_id) == (MOVED, "2", "1", ids["lenet-3-old"])
    assert "Duplicates dropped: 1 older run of the same model and seed (lenet seed 3)." in moved.markdown
    assert f"| {ids['lenet-3-old']} | mnist   |            99.50 | moved from version 1 |" in moved.markdown
    assert (scratch.status, scratch.version) == (UNCHANGED, "1")
    assert str(champion_version(client, "lenet").version) == "2"

    again = compare(uri, EXPERIMENT, None, None, tmp_path, register=True)
    assert [(r.status, r.version) for r in again.registrations] == [(UNCHANGED, "2"), (UNCHANGED, "1")]
    assert versions(client, "lenet") == ["1", "2"] and versions(client, "lenet_scratch") == ["1"]


def test_a_filtered_comparison_never_demotes_a_better_champion(store, tmp_path):
    uri, client, ids = store
    compare(uri, EXPERIMENT, None, None, tmp_path, register=True)
    filtered = compare(uri, EXPERIMENT, None, FIRST, tmp_path, register=True)  # the champion's run is not in it
    lenet = by_model(filtered.registrations)["lenet"]
    assert (lenet.status, lenet.version, lenet.run_id) == (UNCHANGED, "1", ids["lenet-3-old"])
    assert lenet.val_accuracy == 0.995 and versions(client, "lenet") == ["1"]
    assert champion_version(client, "lenet").run_id == ids["lenet-3-old"]


def test_a_champion_registered_by_hand_is_measured_by_its_runs_val_accuracy(store, tmp_path):
    uri, client, ids = store
    compare(uri, EXPERIMENT, None, "tags.model = 'lenet' and params.seed = '3'", tmp_path, register=True)
    version = champion_version(client, "lenet")
    by_hand = client.create_model_version("lenet-lab-lenet", version.source, run_id=version.run_id)  # no tags
    client.set_registered_model_alias("lenet-lab-lenet", "champion", str(by_hand.version))
    lenet = by_model(register_champions(client, load_runs(client, EXPERIMENT, extra_filter=FIRST).runs))["lenet"]
    assert (lenet.status, lenet.version, lenet.val_accuracy) == (UNCHANGED, "2", 0.995)


def test_the_champion_loads_as_pyfunc_and_predicts(store, tmp_path):
    uri, client, ids = store
    compare(uri, EXPERIMENT, None, FIRST, tmp_path, register=True)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/lenet-lab-lenet@champion")
    assert model.metadata.run_id == ids["lenet-0"]
    probabilities = model.predict(np.zeros((1, 28, 28, 1), np.float32))
    assert probabilities.shape == (1, 10) and probabilities.sum() == pytest.approx(1, abs=1e-5)


def test_no_champion_without_a_registered_alias(store, tmp_path):
    uri, client, ids = store
    assert champion_uri(client, "lenet") is None and champion_version(client, "lenet") is None
    client.create_registered_model("lenet-lab-lenet")  # a registered model, but no champion alias
    assert champion_uri(client, "lenet") is None


def test_runs_without_a_logged_model_are_passed_over_not_registered(store, tmp_path):
    uri, client, ids = store
    comparison = compare(uri, EXPERIMENT, None, "params.seed = '2'", tmp_path, register=True)
    (lenet,) = comparison.registrations
    assert (lenet.status, lenet.version, lenet.without_model) == (SKIPPED, None, (ids["lenet-2"],))
    assert ("| lenet        | lenet-lab-lenet  |       — | —     | —   | —       |                — "
            "| skipped: no run with a logged model |") in comparison.markdown
    assert f"Not registered, no logged model: {ids['lenet-2']} (lenet)." in comparison.markdown
    assert champion_uri(client, "lenet") is None and versions(client, "lenet") == []


def test_register_must_be_a_boolean(store, tmp_path):
    uri, *_ = store
    with pytest.raises(UserError, match=r"^register must be true or false, got 'maybe'\.$"):
        compare(uri, EXPERIMENT, None, None, tmp_path / "report", register="maybe")
    assert not (tmp_path / "report").exists()


def test_cli_registers_and_reports_it(store, tmp_path):
    uri, client, ids = store
    out = tmp_path / "report"
    result = run_compare([f"tracking.uri={uri}", "register=true", f"filter=\"{FIRST}\"", f"output_dir={out}"],
                         tmp_path)
    assert result.returncode == 0, result.stderr
    assert "## Registered" in result.stdout
    assert f"| lenet         | lenet-lab-lenet         |       1 | champion | {ids['lenet-0']} |" in result.stdout
    assert "## Registered" in (out / "comparison.md").read_text()
    assert champion_uri(client, "lenet_scratch") == "models:/lenet-lab-lenet_scratch@champion"

    result = run_compare([f"tracking.uri={uri}", "register=maybe"], tmp_path)
    assert (result.returncode, result.stdout) == (2, "")  # a bad setting, like every command's
    assert result.stderr == "error: register must be true or false, got 'maybe'.\n"
