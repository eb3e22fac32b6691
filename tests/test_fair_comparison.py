"""experiment=fair_comparison: one train.py sweep tunes each model with the same budget, trains its seeds at the best
setting found and writes the comparison report; again, it tunes nothing more; its budget checked in one line."""

import optuna
import pytest
from hydra import initialize_config_dir
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from experiments.apps.tune import TuneEachModel, tuning_overrides
from experiments.store import studies
from tests.conftest import CONF_DIR, run_train

BUDGET = ["hydra.callbacks.tune.trials=2", "hydra.callbacks.tune.epochs=1"]


def study_trials(uri: str, model: str) -> list:
    url = studies.storage_url(None, uri, "x")
    study = optuna.load_study(study_name=f"default-mnist-{model}", storage=studies.open_storage(url, False))
    return study.get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def fair(tmp_path_factory):
    """The preset on 256 images per split: 2 models x 1 seed, each model tuned with 2 trials of 1 epoch."""
    tmp = tmp_path_factory.mktemp("fair")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = ["-m", "experiment=fair_comparison", "debug=tiny", "model=lenet,simple_conv", "seed=0", *BUDGET,
            f"tracking.uri={uri}", f"hydra.callbacks.report.output_dir={tmp / 'report'}"]
    return uri, tmp, run_train(args, tmp)


@pytest.mark.slow
def test_each_model_is_tuned_with_the_same_budget_then_trained_at_its_best_and_compared(fair):
    uri, tmp, result = fair
    assert result.returncode == 0, result.stderr[-3000:]
    best = {}
    for model in ("lenet", "simple_conv"):
        trials = study_trials(uri, model)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # tune's default pruner spares the first ones
        best[model] = max(trials, key=lambda t: (t.value, -t.number))
    client = MlflowClient(uri)
    runs = [run for run in client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
            if run.data.tags.get("sweep_parent") != "true"]
    assert sorted((r.data.tags["model"], r.data.params["seed"]) for r in runs) == [("lenet", "0"), ("simple_conv", "0")]
    for run in runs:
        trial = best[run.data.tags["model"]]
        assert run.data.tags["hparams.trial"] == str(trial.number)
        learning_rate = float(run.data.params["optimizer.learning_rate"])
        assert learning_rate == pytest.approx(trial.params["optimizer.learning_rate"])
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    report = (tmp / "report" / "comparison.md").read_text()
    assert "| lenet " in report and "| simple_conv " in report and "## Statistics" in report
    assert "Hyperparameters: each architecture at its own study's best setting, tuned, 2 trials x 1 epochs (same " \
           "budget for all)." in report.replace("\n", " ")
    assert result.stdout.index("tuning: python tune.py") < result.stdout.index("Launching 2 jobs")


@pytest.mark.slow
def test_again_it_tunes_no_study_that_has_its_budget(fair, capsys):
    uri, tmp, first = fair
    assert first.returncode == 0
    config = sweep_config(["experiment=fair_comparison", "debug=tiny", "model=lenet,simple_conv",
                           f"tracking.uri={uri}"])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        TuneEachModel(trials=2, epochs=1).on_multirun_start(config)
    out = capsys.readouterr().out
    for model in ("lenet", "simple_conv"):
        assert f"study default-mnist-{model}: 2 of 2 trials done" in out
        assert len(study_trials(uri, model)) == 2


def sweep_config(task: list[str], params: dict | None = None) -> DictConfig:
    """What a callback of a train.py -m sweep sees of it (hparams=tuned's settings, the sweep's overrides)."""
    return OmegaConf.create({"hparams": {"study": "default", "storage": None},
                             "hydra": {"sweeper": {"params": params or {}}, "overrides": {"task": task},
                                       "runtime": {"choices": {"data": "mnist", "model": "lenet"}}}})


def test_the_tuning_shares_the_sweeps_data_trainer_and_store_not_its_epochs_or_experiment():
    config = sweep_config(["experiment=fair_comparison", "debug=tiny", "data.train_size=500", "trainer.epochs=7",
                           "tracking.uri=sqlite:///s.db", "tracking.experiment=mine", "optimizer.learning_rate=0.1",
                           "seed=4"], {"model": "lenet,vgg_tiny", "seed": "range(3)"})
    assert tuning_overrides(config, 5, 2) == [
        ["data=mnist", f"model={model}", "debug=tiny", "data.train_size=500", "tracking.uri=sqlite:///s.db",
         "optimizer.learning_rate=0.1", "tune.study=default", "tune.trials=5", "tune.epochs=2"]
        for model in ("lenet", "vgg_tiny")]


@pytest.mark.parametrize("override, message", [
    ("hydra.callbacks.tune.trials=0", "error: hydra.callbacks.tune.trials must be an integer >= 1, got 0."),
    ("~hparams", "error: hydra.callbacks.tune tunes the models to train them at the setting found: add "
                     "hparams=tuned."),
])
def test_a_bad_budget_stops_in_one_line_before_anything_is_created(tmp_path, override, message):
    store = tmp_path / "store"
    result = run_train(["-m", "experiment=fair_comparison", override, f"tracking.uri=sqlite:///{store}/mlflow.db"],
                       tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert not store.exists()
