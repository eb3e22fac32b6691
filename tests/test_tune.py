"""tune.py: a tiny study end to end (trials as child runs of the study's parent run, a pruned trial, nothing of the
test split anywhere), an interrupted study resumed to exactly its budget, two processes on one study reaching it
together, train.py hparams=tuned at the best trial's setting, and the one-line errors."""

import os
import signal
import subprocess
import sys

import keras
import optuna
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf
from optuna.trial import TrialState

from experiments import PROJECT_ROOT
from experiments.apps import tune as tune_app
from experiments.config import check
from experiments.errors import UserError
from experiments.run import lifecycle
from experiments.run import trial as trial_run
from experiments.run.lifecycle import Interrupted
from experiments.run.training import make_optimizer, train
from experiments.store import studies
from tests.conftest import CONF_DIR, compose_train, run_train

TINY = ["debug=tiny", "tune.epochs=2", "tune.startup_trials=1"]  # 256 images per split
EXPERIMENT = "lenet-lab-tuning"


def compose_tune(overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="tune", overrides=list(overrides))


class PruneTrialOne(optuna.pruners.BasePruner):
    """Prunes trial 1 at its first report, no other: a pruned trial on demand."""

    def prune(self, study, trial) -> bool:
        return trial.number == 1


def load(uri: str, name: str = "default-mnist-lenet") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=studies.open_storage(studies.storage_url(None, uri, "x"), False))


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], max_results=1000)


def children(uri: str):
    """(parent run, {trial number: run}) of the store's one study."""
    found = runs(uri)
    [parent] = [run for run in found if run.data.tags.get("tune.parent") == "true"]
    trials = {int(run.data.tags["tune.trial"]): run for run in found if run is not parent}
    return parent, trials


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """3 trials of 2 epochs on 256 images, in-process; trial 1 pruned after its first epoch."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('study') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(studies, "make_pruner", lambda tune: PruneTrialOne())
        best = tune_app.tune(compose_tune([*TINY, "tune.trials=3", f"tracking.uri={uri}"]))
    return uri, best


def test_every_trial_is_a_child_run_of_the_studys_parent_run(study):
    uri, best = study
    parent, trials = children(uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["tune.study"] == "default-mnist-lenet"
    assert sorted(trials) == [0, 1, 2]
    optuna_study = load(uri)
    assert [t.state for t in optuna_study.trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert optuna_study.user_attrs[studies.PARENT_RUN_ATTR] == parent.info.run_id
    for number, run in trials.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert optuna_study.trials[number].user_attrs[studies.RUN_ATTR] == run.info.run_id
        assert run.data.params["trainer.epochs"] == "2" and run.data.params["data.train_size"] == "256"
        for key, value in optuna_study.trials[number].params.items():  # the trial's setting is what it trained
            assert run.data.params[key] == str(value)
    best_trial = max((t for t in optuna_study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert best == best_trial.value == trials[best_trial.number].data.metrics["val_accuracy"]
    assert parent.data.tags["tune.best_trial"] == str(best_trial.number)
    assert parent.data.metrics["best_val_accuracy"] == best


def test_a_pruned_trial_stops_at_its_epoch_and_ends_finished_tagged_pruned(study):
    uri, _ = study
    client = MlflowClient(uri)
    _, trials = children(uri)
    pruned = trials[1]
    assert pruned.info.status == "FINISHED"
    assert pruned.data.tags["tune.pruned"] == "true" and pruned.data.tags["tune.pruned_at_epoch"] == "1"
    assert [m.step for m in client.get_metric_history(pruned.info.run_id, "val_accuracy")] == [1]
    for number in (0, 2):
        assert trials[number].data.tags["tune.pruned"] == "false"
        assert [m.step for m in client.get_metric_history(trials[number].info.run_id, "val_accuracy")] == [1, 2]
    # The pruner sees the same steps, epochs trained (Hyperband's resource): 1 and 2, never Keras's 0-based index.
    optuna_study = load(uri)
    assert [sorted(t.intermediate_values) for t in optuna_study.trials] == [[1, 2], [1], [1, 2]]
    assert optuna_study.trials[0].intermediate_values[2] == trials[0].data.metrics["val_accuracy"]


@pytest.mark.parametrize("pruner", ["hyperband", "median"])
def test_the_real_pruners_judge_a_trial_after_its_first_epoch(pruner):
    """Each trial's validation accuracy is below every earlier trial's: both pruners stop some trial after its
    first epoch (Hyperband's first rung is 1 epoch trained; a 0-based step would put it after the second), and
    none in its last epoch."""
    tune = OmegaConf.create({"pruner": pruner, "epochs": 3, "startup_trials": 2})
    study = optuna.create_study(direction="maximize", pruner=studies.make_pruner(tune),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    pruned_at = []
    for number in range(30):
        trial = study.ask()
        callback = trial_run.PruneTrial(trial, epochs=3)
        callback.set_model(model)
        model.stop_training = False
        for epoch in range(3):
            callback.on_epoch_end(epoch, {"val_accuracy": 0.9 - number / 100})
            if model.stop_training:
                break
        pruned_at.append(callback.pruned_at)
        if callback.pruned_at:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, 0.9 - number / 100)
    assert 1 in pruned_at and 3 not in pruned_at
    assert sorted(study.trials[0].intermediate_values) == [1, 2, 3]


def test_no_run_of_the_study_sees_the_test_split(study):
    uri, _ = study
    client = MlflowClient(uri)
    for run in runs(uri):
        assert not [key for key in run.data.metrics if key.startswith("test")], run.info.run_name
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not artifacts & {"test_predictions.npz", "model", "plots"}, run.info.run_name
        assert {d.tags[0].value for d in run.inputs.dataset_inputs} <= {"training", "validation"}


def test_train_and_validate_trains_and_validates_only(store_uri):
    result = trial_run.train_and_validate(compose_train(["debug=tiny", f"tracking.uri={store_uri}"]))
    run = MlflowClient(store_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and (result.epochs, result.pruned) == (1, False)
    assert run.data.metrics["val_accuracy"] == result.val_accuracy
    assert not [key for key in run.data.metrics if key.startswith("test")]
    assert {a.path for a in MlflowClient(store_uri).list_artifacts(result.run_id)} == {"config.yaml",
                                                                                          "model_summary.txt"}


def test_hparams_tuned_trains_at_the_best_trials_setting_and_says_which(study):
    uri, _ = study
    studies.read_setting.cache_clear()
    optuna_study = load(uri)
    best = studies.best_trial(optuna_study)
    result = train(compose_train(["debug=tiny", "hparams=tuned", f"tracking.uri={uri}"]))
    run = MlflowClient(uri).get_run(result.run_id)
    for key, value in best.params.items():
        assert run.data.params[key] == str(value)
    assert run.data.tags["hparams.study"] == "default-mnist-lenet"
    assert run.data.tags["hparams.trial"] == str(best.number)
    assert run.data.tags["hparams.trial_run_id"] == best.user_attrs[studies.RUN_ATTR]
    assert run.data.tags["hparams.budget"] == "3 trials x 2 epochs"  # the study fixture's, pruned trial counted
    other = next(t for t in optuna_study.trials if t.state == TrialState.COMPLETE and t.number != best.number)
    cfg = compose_train(["debug=tiny", "hparams=tuned", f"hparams.trial={other.number}", "optimizer.schedule=constant",
                         f"tracking.uri={uri}"])
    check(cfg)
    assert cfg.optimizer.learning_rate == other.params["optimizer.learning_rate"]
    assert cfg.optimizer.schedule == "constant"  # the command line wins
    assert studies.tuned_tags(cfg)["hparams.trial"] == str(other.number)


@pytest.mark.parametrize("overrides, message", [
    (["model=vgg_tiny"], "hparams=tuned: no study default-mnist-vgg_tiny (model vgg_tiny on mnist) in {db}; tune it "
                         "first: python tune.py model=vgg_tiny data=mnist"),
    (["hparams.study=wide"], "hparams=tuned: no study wide-mnist-lenet (model lenet on mnist) in {db}; tune it first: "
                             "python tune.py model=lenet data=mnist tune.study=wide"),
    (["hparams.trial=1"], "hparams.trial must be a finished trial of study default-mnist-lenet, got 1 (its finished "
                          "trials: 0, 2)."),
    (["optimizer=sgd"], "hparams=tuned: study default-mnist-lenet tuned optimizer=adam, this run has optimizer=sgd; "
                        "train with optimizer=adam, or tune sgd in another study."),
])
def test_hparams_tuned_without_its_study_or_trial_is_one_line(study, overrides, message):
    uri, _ = study
    studies.read_setting.cache_clear()
    with pytest.raises(UserError) as error:
        check(compose_train(["hparams=tuned", *overrides, f"tracking.uri={uri}"]))
    db = uri.replace("mlflow.db", "optuna.db")
    assert str(error.value) == message.format(db=db)


def test_train_py_hparams_tuned_without_a_study_stops_in_one_line(tmp_path, tracking_uri):
    result = run_train(["model=vgg_tiny", "hparams=tuned", f"tracking.uri={tracking_uri}"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    db = tracking_uri.replace("mlflow.db", "optuna.db")
    assert result.stderr.strip().splitlines() == [
        f"error: hparams=tuned: no study default-mnist-vgg_tiny (model vgg_tiny on mnist) in {db}; tune it first: "
        "python tune.py model=vgg_tiny data=mnist"]


def test_an_interrupted_study_resumes_to_exactly_its_budget(tmp_path, monkeypatch):
    """Ctrl-C in trial 0's first epoch: its run KILLED, its trial FAIL (not counted), the parent KILLED; a trial left
    RUNNING by a process that died is failed too; the same command again tries trial 0's setting again and ends with
    exactly 1 counted trial; with tune.trials=2 it runs one more."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    budget = [*TINY, "tune.epochs=1", "tune.pruner=none", f"tracking.uri={uri}"]

    def ctrl_c(self, batch, logs=None):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(lifecycle, "received", None)
    with monkeypatch.context() as patch, pytest.raises(Interrupted) as stopped:
        patch.setattr(trial_run.PruneTrial, "on_train_batch_end", ctrl_c)
        tune_app.tune(compose_tune([*budget, "tune.trials=1"]))
    assert stopped.value.exit_code == 130
    parent, trials = children(uri)
    assert parent.info.status == "KILLED" and trials[0].info.status == "KILLED"
    assert [t.state for t in load(uri).trials] == [TrialState.FAIL]

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = load(uri).ask()  # a trial whose process was SIGKILLed
    orphan.set_user_attr("host", studies.process_tags()["host"])
    orphan.set_user_attr("pid", dead.stdout.strip())

    tune_app.tune(compose_tune([*budget, "tune.trials=1"]))
    resumed = load(uri).trials
    assert [t.state for t in resumed] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert resumed[2].user_attrs[studies.RETRY_ATTR] == 0 and resumed[2].params == resumed[0].params  # tried again
    again, trials = children(uri)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert sorted(trials) == [0, 2]

    tune_app.tune(compose_tune([*budget, "tune.trials=1"]))  # nothing left to do
    assert len(load(uri).trials) == 3
    tune_app.tune(compose_tune([*budget, "tune.trials=2"]))  # one more
    assert [t.state for t in load(uri).trials][-1] == TrialState.COMPLETE and len(load(uri).trials) == 4


def test_a_diverging_trial_is_pruned_and_counts(store_uri):
    space = [f"tune.space.learning_rate.{key}" for key in ("low=1e6", "high=1e6", "log=false")]
    cfg = compose_tune([*TINY, "optimizer=sgd", *space, "tune.trials=1", f"tracking.uri={store_uri}"])
    assert tune_app.tune(cfg) is None
    [trial] = load(store_uri).trials
    assert trial.state == TrialState.PRUNED and trial.user_attrs["stopped"].startswith("diverged: loss became nan")
    _, trials = children(store_uri)
    assert trials[0].info.status == "FAILED" and trials[0].data.tags["tune.pruned"] == "diverged"


def test_a_study_refuses_other_settings_in_one_line(tracking_uri, monkeypatch):
    storage = studies.open_storage(studies.storage_url(None, tracking_uri, "x"), heartbeat=False)
    studies.open_study(storage, "default-mnist-lenet", compose_tune([*TINY, f"tracking.uri={tracking_uri}"]))
    with pytest.raises(UserError) as error:
        studies.open_study(storage, "default-mnist-lenet", compose_tune([*TINY, "tune.epochs=3"]))
    assert str(error.value) == ("study default-mnist-lenet was begun with tune.epochs=2, this run has 3: its trials "
                                "would not be comparable; keep the study's settings, or begin another study with "
                                "tune.study=<name>.")
    studies.open_study(storage, "default-mnist-lenet", compose_tune([*TINY, "tune.trials=50"]))  # not a setting


@pytest.mark.slow
def test_two_processes_on_one_study_reach_exactly_its_budget_together(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    args = [sys.executable, str(PROJECT_ROOT / "tune.py"), "debug=tiny", "tune.epochs=1", "tune.trials=4",
            "tune.pruner=none", f"tracking.uri={uri}"]
    procs = [subprocess.Popen([*args, f"hydra.run.dir={tmp_path}/hydra{i}"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, output[-3000:]
    trials = load(uri).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    parent, runs_by_trial = children(uri)
    assert sorted(runs_by_trial) == [0, 1, 2, 3] and parent.info.status == "FINISHED"
    assert {t.user_attrs["pid"] for t in trials} == {str(proc.pid) for proc in procs}  # both worked on it
    assert not any(key.startswith("test") for run in runs_by_trial.values() for key in run.data.metrics)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 4  # each process drew its own settings


def test_tune_py_stops_a_bad_setting_in_one_line_creating_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "tune.py"), "tune.trials=0", f"tracking.uri={uri}",
                             f"hydra.run.dir={tmp_path}/hydra"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: tune.trials must be an integer >= 1, got 0."]
    assert not (tmp_path / "store").exists() and not (tmp_path / "hydra").exists()


def test_where_studies_live():
    assert studies.storage_url(None, "sqlite:////data/lab/mlflow.db", "tune.storage") == "sqlite:////data/lab/optuna.db"
    assert (studies.storage_url(None, "postgresql://lab@db.example:5432/mlflow?sslmode=require", "tune.storage")
            == "postgresql://lab@db.example:5432/mlflow_optuna?sslmode=require")
    assert studies.storage_url("sqlite:///studies.db", "http://x:5000", "tune.storage") == \
        f"sqlite:///{PROJECT_ROOT / 'studies.db'}"
    with pytest.raises(UserError, match=r"^tune.storage must be sqlite:///<path> or postgresql://<host>/<database> "
                                        r"with a tracking server \(tracking.uri=http://x:5000 keeps no study\), "
                                        r"got None\.$"):
        studies.storage_url(None, "http://x:5000", "tune.storage")


def test_weight_decay_reaches_the_optimizer():
    adam = compose_train(["optimizer.weight_decay=0.01"]).optimizer
    assert make_optimizer(adam, steps_per_epoch=100, epochs=1).weight_decay == 0.01
    assert make_optimizer(compose_train(["optimizer=sgd"]).optimizer, 100, 1).weight_decay is None  # 0: off
