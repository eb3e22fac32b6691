"""compare.py against a synthetic MLflow store: known runs in, the exact table and files out."""

import csv
import math
import re
import socket
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from experiments import PROJECT_ROOT
from experiments.analysis.comparison import FILES
from experiments.apps.compare import compare, default_output_dir
from experiments.errors import UserError
from experiments.store.runs import load_runs, open_store
from experiments.store.tracking import setup_experiment

EXPERIMENT = "lenet-lab"
SWEEP = "20250101-120000-abc123"


def log_run(client, experiment_id, model, seed, *, test_accuracy=None, test_loss=None, val_accuracy=(),
            epoch_seconds=(), images_per_second=(), parameters=44_426, dataset="mnist", epochs=2,
            status="FINISHED", parent=None, start_time=None, logged_at=None, tags=None) -> str:
    """A run as train.py logs it: params, tags, per-epoch history and (when given) test metrics, logged
    at ``logged_at`` (milliseconds since the epoch; None: now)."""
    tags = {"architecture": model.removesuffix("_scratch"), "model": model, "dataset": dataset,
            "layers": "scratch" if model.endswith("_scratch") else "builtin", **(tags or {})}
    if parent:
        tags |= {"sweep_id": SWEEP, "mlflow.parentRunId": parent}
    run_id = client.create_run(experiment_id, run_name=f"{model}-{dataset}-seed{seed}", tags=tags,
                               start_time=start_time).info.run_id
    now = logged_at or int(time.time() * 1000)
    history = [Metric(key, value, now, epoch)
               for key, values in [("val_accuracy", val_accuracy), ("epoch_seconds", epoch_seconds),
                                   ("images_per_second", images_per_second)]
               for epoch, value in enumerate(values, start=1)]
    final = {"parameter_count": parameters, "test_accuracy": test_accuracy, "test_loss": test_loss}
    history += [Metric(key, value, now, 0) for key, value in final.items() if value is not None]
    params = {"model.name": model, "data.name": dataset, "trainer.epochs": epochs, "seed": seed}
    client.log_batch(run_id, metrics=history, params=[Param(k, str(v)) for k, v in params.items()])
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture
def store(store_uri):
    """One sweep (parent run; lenet x3, simple_conv x2, lenet_scratch x1 finished, one failed, one
    still running) and one run outside it, on another dataset."""
    client = MlflowClient(store_uri)
    experiment_id = setup_experiment(store_uri, EXPERIMENT)
    parent = client.create_run(experiment_id, run_name=f"sweep-{SWEEP}",
                               tags={"sweep_id": SWEEP, "sweep_parent": "true"}).info.run_id
    sweep = dict(client=client, experiment_id=experiment_id, parent=parent)
    ids = {
        "lenet-0": log_run(**sweep, model="lenet", seed=0, test_accuracy=0.990, test_loss=0.030,
                           val_accuracy=[0.950, 0.980], epoch_seconds=[2.0, 1.0], images_per_second=[1000, 3000]),
        "lenet-1": log_run(**sweep, model="lenet", seed=1, test_accuracy=0.992, test_loss=0.032,
                           val_accuracy=[0.960, 0.985], epoch_seconds=[2.5, 1.5], images_per_second=[2000, 2000]),
        "lenet-2": log_run(**sweep, model="lenet", seed=2, test_accuracy=0.988, test_loss=0.028,
                           val_accuracy=[0.940, 0.975], epoch_seconds=[3.0, 2.0], images_per_second=[2500, 3500]),
        "simple_conv-0": log_run(**sweep, model="simple_conv", seed=0, test_accuracy=0.985, test_loss=0.050,
                                 parameters=13_610, val_accuracy=[0.930, 0.970], epoch_seconds=[1.0, 1.0],
                                 images_per_second=[5000, 5000]),
        "simple_conv-1": log_run(**sweep, model="simple_conv", seed=1, test_accuracy=0.983, test_loss=0.054,
                                 parameters=13_610, val_accuracy=[0.920, 0.965], epoch_seconds=[1.2, 0.8],
                                 images_per_second=[4000, 6000]),
        "lenet_scratch-0": log_run(**sweep, model="lenet_scratch", seed=0, test_accuracy=0.9905, test_loss=0.029,
                                   val_accuracy=[0.955, 0.982], epoch_seconds=[10.0, 12.0],
                                   images_per_second=[500, 400]),
        "failed": log_run(**sweep, model="lenet", seed=3, val_accuracy=[0.5], epoch_seconds=[2.0],
                          images_per_second=[1000], status="FAILED"),
        "running": log_run(**sweep, model="simple_conv", seed=2, val_accuracy=[0.9], epoch_seconds=[1.0],
                           images_per_second=[5000], status="RUNNING"),
        "fashion": log_run(client, experiment_id, "lenet", 0, test_accuracy=0.900, test_loss=0.300,
                           dataset="fashion_mnist", epochs=5, val_accuracy=[0.8, 0.85, 0.87, 0.88, 0.89],
                           epoch_seconds=[2.0] * 5, images_per_second=[2000] * 5),
    }
    client.set_terminated(parent, "FINISHED")
    return store_uri, client, parent, ids


SWEEP_TABLE = """\
| Architecture  | Layers  | Runs | Test accuracy (%) |       Test loss | Parameters | Epochs | s/epoch | Images/s |
|---------------|---------|-----:|------------------:|----------------:|-----------:|-------:|--------:|---------:|
| lenet_scratch | scratch |    1 |         99.05 ± — |      0.0290 ± — |     44,426 |      2 |   11.00 |      450 |
| lenet         | builtin |    3 |      99.00 ± 0.20 | 0.0300 ± 0.0020 |     44,426 |      2 |    2.00 |    2,333 |
| simple_conv   | builtin |    2 |      98.40 ± 0.14 | 0.0520 ± 0.0028 |     13,610 |      2 |    1.00 |    5,000 |"""

NOTES = """\
Test accuracy and loss: mean ± sample standard deviation over the runs (seeds); — with a single run.

s/epoch and images/s: training pass, mean over epochs, then over runs."""

NOT_TUNED_NOTE = ("Hyperparameters: not tuned per architecture (the runs' configs), so the ranking also says how well "
                  "those settings suit each; experiment=fair_comparison tunes each with one budget first.")


def test_sweep_report_is_the_exact_table_best_first_with_left_out_runs_counted(store, tmp_path):
    uri, *_ = store
    comparison = compare(uri, EXPERIMENT, SWEEP, None, tmp_path)
    # The statistics section (tests/test_statistics.py) stands between the table and the notes.
    assert comparison.markdown.startswith(
        f"# Architecture comparison\n\nExperiment `lenet-lab`, runs matching `tags.sweep_id = '{SWEEP}'`.\n\n"
        f"{SWEEP_TABLE}\n\n## Statistics\n\n"
    )
    assert comparison.markdown.endswith(f"\n\n## Notes\n\n{NOTES}\n\n{NOT_TUNED_NOTE}\n\n"
                                        "Left out: 1 failed, 1 running.\n")
    assert (tmp_path / "comparison.md").read_text() == comparison.markdown


def test_csv_has_the_raw_numbers(store, tmp_path):
    uri, *_ = store
    compare(uri, EXPERIMENT, SWEEP, None, tmp_path)
    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row.pop("model") for row in rows] == ["lenet_scratch", "lenet", "simple_conv"]
    numbers = ["test_accuracy_mean", "test_accuracy_std", "test_loss_mean", "test_loss_std", "epoch_seconds",
               "images_per_second"]
    expected = [
        dict(zip(numbers, [0.9905, math.nan, 0.029, math.nan, 11.0, 450.0], strict=True)),
        dict(zip(numbers, [0.99, 0.002, 0.03, 0.002, 2.0, 7000 / 3], strict=True)),
        dict(zip(numbers, [0.984, 0.002 / 2**0.5, 0.052, 0.004 / 2**0.5, 1.0, 5000.0], strict=True)),
    ]
    for row, want in zip(rows, expected, strict=True):
        got = {key: float(row[key]) if row[key] else math.nan for key in numbers}  # no std of one run
        assert got == pytest.approx(want, rel=1e-9, nan_ok=True)
    settings = [{key: row[key] for key in ["layers", "dataset", "runs", "parameter_count", "epochs"]} for row in rows]
    assert settings == [
        {"layers": "scratch", "dataset": "mnist", "runs": "1", "parameter_count": "44426", "epochs": "2"},
        {"layers": "builtin", "dataset": "mnist", "runs": "3", "parameter_count": "44426", "epochs": "2"},
        {"layers": "builtin", "dataset": "mnist", "runs": "2", "parameter_count": "13610", "epochs": "2"},
    ]


def test_sweep_id_selects_that_sweeps_finished_children_never_its_parent(store):
    uri, client, parent, ids = store
    swept = load_runs(client, EXPERIMENT, sweep_id=SWEEP)
    finished = {ids[k] for k in ["lenet-0", "lenet-1", "lenet-2", "simple_conv-0", "simple_conv-1", "lenet_scratch-0"]}
    assert {run.run_id for run in swept.runs} == finished
    assert swept.left_out == {"failed": 1, "running": 1}
    everything = load_runs(client, EXPERIMENT)
    assert {run.run_id for run in everything.runs} == finished | {ids["fashion"]}
    assert parent not in {run.run_id for run in everything.runs}


@pytest.mark.parametrize("extra_filter", ["tags.dataset = 'fashion_mnist'", "params.trainer.epochs = '5'"])
def test_extra_filter_narrows_the_runs(store, extra_filter):
    uri, client, _, ids = store
    assert [run.run_id for run in load_runs(client, EXPERIMENT, extra_filter=extra_filter).runs] == [ids["fashion"]]
    assert load_runs(client, EXPERIMENT, sweep_id=SWEEP, extra_filter=extra_filter).runs == []


def test_runs_of_unlike_settings_are_flagged(store, tmp_path):
    uri, *_ = store
    markdown = compare(uri, EXPERIMENT, None, None, tmp_path).markdown
    assert "Experiment `lenet-lab`, all runs." in markdown
    assert "| lenet         | builtin |    4 |      96.75 ± 4.50 |" in markdown
    assert markdown.endswith("Left out: 1 failed, 1 running.\n\n"
                             "Mixed settings: lenet (dataset fashion_mnist/mnist, epochs 2/5). "
                             "Narrow the runs with sweep_id= or filter=.\n")


def test_twins_pooled_under_one_name_are_flagged(store, tmp_path):
    """``experiment=strong model.layers=scratch`` logs the scratch twin as model bn_cnn, layers scratch."""
    uri, client, *_ = store
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for seed, layers in [(0, "builtin"), (1, "builtin"), (0, "scratch")]:
        log_run(client, experiment_id, "bn_cnn", seed, test_accuracy=0.996, test_loss=0.01, val_accuracy=[0.99],
                epoch_seconds=[1.0], images_per_second=[1000], tags={"layers": layers})
    markdown = compare(uri, EXPERIMENT, None, "tags.model = 'bn_cnn'", tmp_path).markdown.replace("\n", " ")
    assert ("Mixed settings: bn_cnn (layers builtin/scratch). Narrow the runs with sweep_id= or filter= (a scratch "
            "twin keeps its own name when trained as model=<name>_scratch).") in markdown


def test_the_report_says_how_each_architecture_was_tuned_and_flags_unequal_budgets(store, tmp_path):
    uri, client, parent, _ = store
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for model, budget in [("lenet", "20 trials x 3 epochs"), ("simple_conv", "10 trials x 3 epochs")]:
        for seed in (0, 1):
            log_run(client, experiment_id, model, seed, test_accuracy=0.99, test_loss=0.03, val_accuracy=[0.98],
                    epoch_seconds=[1.0], images_per_second=[1000], epochs=1,
                    tags={"hparams.study": f"default-mnist-{model}", "hparams.budget": budget, "stage": "tuned"})
    tuned = "tags.stage = 'tuned'"
    markdown = compare(uri, EXPERIMENT, None, tuned, tmp_path).markdown.replace("\n", " ")
    assert ("Hyperparameters chosen unequally: lenet tuned, 20 trials x 3 epochs; simple_conv tuned, 10 trials x 3 "
            "epochs. The comparison is not on equal terms.") in markdown
    markdown = compare(uri, EXPERIMENT, None, f"{tuned} and tags.model = 'lenet'", tmp_path).markdown.replace("\n", " ")
    assert ("Hyperparameters: each architecture at its own study's best setting, tuned, 20 trials x 3 epochs (same "
            "budget for all).") in markdown


def test_report_files_are_written_and_logged_to_the_sweep_parent(store, tmp_path):
    uri, client, parent, _ = store
    comparison = compare(uri, EXPERIMENT, SWEEP, None, tmp_path / "report")
    assert comparison.output_dir == tmp_path / "report" and comparison.parent_run_id == parent
    for name in FILES:
        content = (tmp_path / "report" / name).read_bytes()
        if name.endswith(".png"):
            assert content.startswith(b"\x89PNG\r\n\x1a\n"), name
    logged = {artifact.path for artifact in client.list_artifacts(parent, "comparison")}
    assert logged == {f"comparison/{name}" for name in FILES}


def test_runs_outside_a_sweep_log_nothing(store, tmp_path):
    uri, client, parent, ids = store
    comparison = compare(uri, EXPERIMENT, None, "tags.dataset = 'fashion_mnist'", tmp_path)
    assert comparison.parent_run_id is None
    assert client.list_artifacts(parent) == [] and client.list_artifacts(ids["fashion"]) == []


@pytest.mark.parametrize("standalone_is_later", [True, False])
def test_one_seed_counts_once_the_latest_run_of_it(store, tmp_path, standalone_is_later):
    uri, client, _, ids = store
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    swept = client.get_run(ids["lenet-1"]).info.start_time
    standalone = log_run(client, experiment_id, "lenet", 1, test_accuracy=0.994, test_loss=0.020,
                         val_accuracy=[0.960, 0.990], epoch_seconds=[2.0, 2.0], images_per_second=[2000, 2000],
                         start_time=swept + (60_000 if standalone_is_later else -60_000))
    kept, dropped = (standalone, ids["lenet-1"]) if standalone_is_later else (ids["lenet-1"], standalone)

    selection = load_runs(client, EXPERIMENT)
    assert [run.run_id for run in selection.duplicates] == [dropped]
    assert kept in {run.run_id for run in selection.runs} and dropped not in {run.run_id for run in selection.runs}
    assert ids["fashion"] in {run.run_id for run in selection.runs}  # lenet seed 0 too, but another dataset

    markdown = compare(uri, EXPERIMENT, None, "tags.dataset = 'mnist'", tmp_path).markdown
    assert "| lenet         | builtin |    3 |" in markdown
    assert "\n\nDuplicates dropped: 1 older run of the same model and seed (lenet seed 1).\n" in markdown
    with open(tmp_path / "comparison.csv", newline="") as f:
        lenet = next(row for row in csv.DictReader(f) if row["model"] == "lenet")
    accuracy = [0.990, 0.994 if standalone_is_later else 0.992, 0.988]
    assert lenet["runs"] == "3" and float(lenet["test_accuracy_mean"]) == pytest.approx(sum(accuracy) / 3)
    assert "Duplicates" not in compare(uri, EXPERIMENT, SWEEP, None, tmp_path).markdown  # the sweep has one of each


def test_duplicates_note_counts_and_orders_the_dropped_seeds(store, tmp_path):
    uri, client, *_ = store
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    old_runs = [("simple_conv", 1, 1), ("lenet", 2, 2), ("lenet", 10, 1), ("lenet", 2, 1), ("lenet", 10, 2)]
    for model, seed, start_time in old_runs:  # long before the sweep's runs, but lenet seed 10 twice
        log_run(client, experiment_id, model, seed, test_accuracy=0.9, test_loss=0.3, val_accuracy=[0.9, 0.9],
                epoch_seconds=[1.0, 1.0], images_per_second=[1000, 1000], start_time=start_time)
    markdown = compare(uri, EXPERIMENT, None, "tags.dataset = 'mnist'", tmp_path).markdown
    assert ("Duplicates dropped: 4 older runs of the same model and seed "
            "(lenet seed 2 ×2, lenet seed 10, simple_conv seed 1).") in markdown
    assert "| lenet         | builtin |    4 |" in markdown and "| simple_conv   | builtin |    2 |" in markdown


def test_default_output_dir_is_under_reports_named_by_sweep_or_time():
    assert default_output_dir(SWEEP) == PROJECT_ROOT / "reports" / f"compare-{SWEEP}"
    assert re.fullmatch(r"compare-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", default_output_dir(None).name)


def test_bad_settings_are_user_errors_naming_the_field(store, tmp_path):
    uri, client, *_ = store
    with pytest.raises(UserError, match="tracking.experiment 'nope': no such experiment"):
        load_runs(client, "nope")
    with pytest.raises(UserError, match="invalid search filter 'tags.dataset ='"):
        load_runs(client, EXPERIMENT, extra_filter="tags.dataset =")
    only_failed = f"matching \"tags.sweep_id = '{SWEEP}' and params.seed = '3'\" (left out: 1 failed)."
    with pytest.raises(UserError, match=re.escape(only_failed)):
        compare(uri, EXPERIMENT, SWEEP, "params.seed = '3'", tmp_path / "report")
    assert not (tmp_path / "report").exists()
    missing = tmp_path / "missing.db"
    with pytest.raises(UserError, match=f"tracking.uri 'sqlite:///{missing}': no MLflow database"):
        open_store(f"sqlite:///{missing}")
    assert not missing.exists()


def run_compare(args, tmp_path) -> subprocess.CompletedProcess:
    """``python compare.py ARGS`` from an unrelated directory, Hydra's outputs in tmp_path."""
    cmd = [sys.executable, str(PROJECT_ROOT / "compare.py"), *args, f"hydra.run.dir={tmp_path}/hydra"]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_cli_prints_the_table_and_the_report_folder(store, tmp_path):
    uri, *_ = store
    out = tmp_path / "report"
    result = run_compare([f"tracking.uri={uri}", f"sweep_id={SWEEP}", f"output_dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert SWEEP_TABLE in result.stdout
    assert result.stdout.rstrip().endswith(f"Report written to {out}")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


def test_cli_without_runs_to_compare_says_so_in_one_line(store, tmp_path):
    uri, *_ = store
    args = [f"tracking.uri={uri}", "filter=\"tags.dataset = 'cifar10'\"", f"output_dir={tmp_path}/report"]
    result = run_compare(args, tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "error: no finished runs to compare in experiment 'lenet-lab' matching \"tags.dataset = 'cifar10'\".\n"
    )
    assert not (tmp_path / "report").exists()


MINUTE = 60_000


def test_a_dead_run_of_this_host_is_marked_killed_and_left_out_as_killed(store, tmp_path):
    uri, client, parent, _ = store
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = log_run(client, client.get_experiment_by_name(EXPERIMENT).experiment_id, "lenet", 4, val_accuracy=[0.9],
                   status="RUNNING", parent=parent,
                   tags={"host": socket.gethostname(), "pid": str(gone.pid), "pid_started": "1"})
    markdown = compare(uri, EXPERIMENT, SWEEP, None, tmp_path).markdown
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(dead).data.tags["error"] == f"process {gone.pid} on {socket.gethostname()} disappeared"
    assert markdown.endswith("Left out: 1 failed, 1 killed, 1 running.\n")


def test_a_running_run_of_another_host_is_stale_once_it_stopped_logging(store, tmp_path):
    uri, client, parent, _ = store
    now = int(time.time() * 1000)
    elsewhere = dict(client=client, experiment_id=client.get_experiment_by_name(EXPERIMENT).experiment_id,
                     model="lenet", val_accuracy=[0.9], status="RUNNING", parent=parent, start_time=now - 180 * MINUTE,
                     tags={"host": "another-host", "pid": "1", "pid_started": "1"})
    stale = log_run(**elsewhere, seed=4, logged_at=now - 61 * MINUTE)
    recent = log_run(**elsewhere, seed=5, logged_at=now - 5 * MINUTE)  # started long ago, but logging
    markdown = compare(uri, EXPERIMENT, SWEEP, None, tmp_path).markdown
    assert markdown.endswith("Left out: 1 failed, 1 stale, 2 running.\n")
    assert client.get_run(stale).info.status == client.get_run(recent).info.status == "RUNNING"  # not this host's
    assert load_runs(client, EXPERIMENT, SWEEP, stale_after_minutes=62).left_out == {"failed": 1, "running": 3}


def test_cli_refuses_a_stale_after_minutes_that_is_not_a_positive_number(store, tmp_path):
    uri, *_ = store
    result = run_compare([f"tracking.uri={uri}", f"sweep_id={SWEEP}", "stale_after_minutes=0"], tmp_path)
    assert (result.returncode, result.stdout) == (2, "")  # a bad setting, like every command's
    assert result.stderr == "error: stale_after_minutes must be a number > 0, got 0.\n"
