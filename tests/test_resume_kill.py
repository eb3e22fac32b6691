"""A run killed by SIGKILL at the end of an epoch, right before or right after its checkpoint is renamed into
place, resumes with ``resume=<run id>`` to the run that was never killed, bit for bit (also a run of the strong preset:
dropout, batch normalization, random rotations and scaling, warm-up, the epoch kept on validation); a run killed before
its first checkpoint starts again from epoch 0 as the same run; a resume that is refused leaves the run as it was.

The kill is placed by a hook, not by timing: the killed ``train.py`` runs in a subprocess whose ``os.replace``
(the checkpoint's rename) or ``Outbox.metrics`` (the epoch's metrics) sends the process SIGKILL at the chosen
epoch."""

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from experiments import PROJECT_ROOT
from experiments.apps.train import start
from experiments.errors import UserError
from experiments.run.checkpoints import FILE, Checkpoints, saved_metrics
from experiments.run.training import train
from experiments.store.runs import process_tags
from experiments.store.tracking import setup_experiment
from tests.conftest import compose_train

ARGS = ("data.train_size=256", "data.test_size=128", "data.val_size=128", "trainer.epochs=3",
        "trainer.batch_size=32", "seed=7", "trainer.plots=false")
PRESET = ("experiment=strong", *ARGS)  # the preset's recipe, at the size of ARGS
EXACT = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")  # per epoch; timings differ

# python -c KILLER <where> <epoch> <train.py overrides>: train.py, killed with SIGKILL at <where> of epoch <epoch>
KILLER = """
import os, signal, sys
from pathlib import Path

from experiments.cli import run  # every command's start-up, as train.py does it
from experiments.store import offline

where, epoch = sys.argv[1], int(sys.argv[2])
sys.argv = ["train.py", *sys.argv[3:]]
renames, rename, log_metrics = [], os.replace, offline.Outbox.metrics


def replace(src, dst, **kwargs):  # the checkpoint's rename: epoch <epoch>'s is never done
    if Path(src).name == ".checkpoint.npz.partial":  # not MLflow's copy of it into the artifacts
        renames.append(dst)
        if where == "before-rename" and len(renames) == epoch:
            os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, **kwargs)


def metrics(self, values, step=0):  # the epoch's metrics: epoch <epoch>'s are never logged
    if where == "before-metrics" and step == epoch and "loss" in values:
        os.kill(os.getpid(), signal.SIGKILL)
    return log_metrics(self, values, step)


os.replace, offline.Outbox.metrics = replace, metrics
run("train")
"""


def killed_run(tmp_path, uri: str, where: str, epoch: int, args=ARGS) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", KILLER, where, str(epoch), *args, f"tracking.uri={uri}",
           f"hydra.run.dir={tmp_path}/hydra"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def only_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
    return client, run


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in EXACT}


def saved_arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files if key.startswith(("weight_", "optimizer_", "random_", "kept_"))}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The run never killed, of given overrides (each trained once): its result, final checkpoint's arrays, metric
    histories and metrics."""
    runs = {}

    def never_killed(args: tuple[str, ...]):
        if args not in runs:
            root = tmp_path_factory.mktemp("clean")
            uri = f"sqlite:///{root / 'mlflow.db'}"
            result = train(compose_train([*args, f"tracking.uri={uri}"]))
            client = MlflowClient(uri)
            runs[args] = (result, saved_arrays(root / "checkpoints" / result.run_id / FILE),
                          histories(client, result.run_id), client.get_run(result.run_id).data.metrics)
        return runs[args]

    return never_killed


@pytest.mark.parametrize("args, where, epoch, logged, checkpointed", [
    # its first epoch: no checkpoint at all, the run starts again from epoch 0
    pytest.param(ARGS, "before-rename", 1, [], None, id="before-rename-of-epoch-1"),
    # the epoch is repeated (~12 s each alone, ~30 s beside another test process: slow)
    pytest.param(ARGS, "before-rename", 2, [1], 1, id="before-rename-of-epoch-2", marks=pytest.mark.slow),
    # the epoch's metrics are logged from its checkpoint
    pytest.param(ARGS, "before-metrics", 2, [1], 2, id="after-rename-before-metrics-of-epoch-2",
                 marks=pytest.mark.slow),
    # the strong preset's epoch is repeated: its dropout draws, random rotations and kept epoch go on as if never killed
    pytest.param(PRESET, "before-rename", 2, [1], 1, id="strong-preset-before-rename-of-epoch-2",
                 marks=pytest.mark.slow),
])
def test_a_run_killed_at_an_epochs_end_resumes_to_the_run_never_killed(tmp_path, clean, args, where, epoch, logged,
                                                                      checkpointed):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    killed = killed_run(tmp_path, uri, where, epoch, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    client, run = only_run(uri)
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"  # nothing could mark it: the process died at once
    assert [step for step, _ in histories(client, run_id)["loss"]] == logged  # every logged epoch ...
    checkpoint = tmp_path / "store" / "checkpoints" / run_id / FILE
    if checkpointed is None:
        assert not checkpoint.exists() and checkpoint.with_name(f".{FILE}.partial").exists()
    else:
        with np.load(checkpoint) as saved:
            assert int(saved["epochs_done"]) == checkpointed  # ... has its checkpoint

    resumed = start(compose_train([f"resume={run_id}", f"tracking.uri={uri}"]), [f"resume={run_id}"], None)
    clean_result, clean_arrays, clean_histories, clean_metrics = clean(args)
    client, run = only_run(uri)
    assert resumed.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == str(checkpointed or 0) and "error" not in run.data.tags
    assert not checkpoint.with_name(f".{FILE}.partial").exists()
    assert histories(client, run_id) == clean_histories  # every epoch once, bit for bit
    timed = [m.step for m in client.get_metric_history(run_id, "epoch_seconds")]
    assert sorted(timed) == ([1, 3] if where == "before-metrics" else [1, 2, 3])  # a lost epoch's clock stays lost
    for key in ("test_loss", "test_accuracy", "parameter_count"):
        assert run.data.metrics[key] == clean_metrics[key], key
    arrays = saved_arrays(checkpoint)
    assert arrays.keys() == clean_arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, clean_arrays[key], err_msg=key)
    assert (resumed.test_loss, resumed.test_accuracy) == (clean_result.test_loss, clean_result.test_accuracy)


def test_a_refused_resume_leaves_the_run_as_it_was(store_uri):
    """A run whose store logged an epoch that no checkpoint holds (deleted since) is refused in one line, before
    it is taken up again: still KILLED, its error kept."""
    experiment_id = setup_experiment(store_uri, "lenet-lab")
    client = MlflowClient(store_uri)
    tags = {**process_tags(), "error": "interrupted (signal SIGTERM)"}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    cfg = compose_train([*ARGS, f"tracking.uri={store_uri}"])
    client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
    client.log_metric(run_id, "loss", 0.5, step=1)
    client.set_terminated(run_id, "KILLED")
    with pytest.raises(UserError) as refused:
        start(compose_train([f"resume={run_id}", f"tracking.uri={store_uri}"]), [f"resume={run_id}"], None)
    assert str(refused.value).startswith(f"resume={run_id}: the run logged 1 epoch but it has no checkpoint (in ")
    assert str(refused.value).endswith("or among its artifacts); start it again without resume=.")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted (signal SIGTERM)"


def test_a_stale_partial_checkpoint_is_removed_by_the_next_save(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    checkpoints = Checkpoints(tmp_path / "run")
    partial = checkpoints.directory / f".{FILE}.partial"
    partial.parent.mkdir()
    partial.write_bytes(b"PK\x03\x04 half a zip, left by a kill")
    partial.chmod(0o444)
    checkpoints.save(model, epochs_done=1, metrics={"loss": 0.25, "val_accuracy": 0.5})
    assert not partial.exists()
    assert sorted(p.name for p in checkpoints.directory.iterdir()) == [FILE]
    assert saved_metrics(checkpoints.path) == {"loss": 0.25, "val_accuracy": 0.5}
