"""Runs that survive: resume after a real SIGKILL, or after a signal that stopped training at a batch's end,
to the same final weights, checkpoints that a kill cannot corrupt, dead runs found, a diverged loss stopped
at once."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from experiments import PROJECT_ROOT
from experiments.apps.train import start
from experiments.errors import UserError
from experiments.run import lifecycle
from experiments.run.callbacks import Diverged, SetEpoch
from experiments.run.checkpoints import FILE, Checkpoints, checkpoint_dir
from experiments.run.lifecycle import (
    INTERRUPTS,
    Interrupted,
    catch_interrupts,
    interrupts_kept,
    signal_of,
    tracked_run,
)
from experiments.run.training import train
from experiments.store.logged import load_model
from experiments.store.runs import mark_dead_runs, process_tags, runs_uri
from tests.conftest import compose_train, run_train

QUICK = ["data.train_size=1000", "data.test_size=200", "data.val_size=500", "trainer.plots=false"]


def only_run(uri):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
    return client, run


def history(client, run_id, key="loss"):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def final_weights(uri, run_id):
    mlflow.set_tracking_uri(uri)
    return load_model(runs_uri(run_id)).model.get_weights()


def checkpoint_stored(uri: str) -> bool:
    """Whether the (only) run in the store at ``uri`` has logged its checkpoint artifact."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
    return bool(runs) and bool(client.list_artifacts(runs[0].info.run_id, "checkpoint"))


@pytest.mark.slow
def test_sigkill_in_epoch_2_then_resume_on_another_checkout_ends_like_the_uninterrupted_run(tmp_path):
    """kill -9 during epoch 2 of 3, the local checkpoint gone (as on another machine), resume through
    the tracking URI: the same run ends FINISHED with the uninterrupted run's weights and history."""
    args = ["data.train_size=20000", "data.test_size=500", "trainer.epochs=3", "seed=5",  # epochs of >= 1 s
            "trainer.plots=false"]
    killed_uri, clean_uri = (f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("killed", "clean"))
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), *args, f"tracking.uri={killed_uri}",
           f"hydra.run.dir={tmp_path}/hydra"]
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob(f"*/{FILE}")) and time.monotonic() < deadline:  # epoch 1 saved here
        time.sleep(0.05)
    while not checkpoint_stored(killed_uri) and time.monotonic() < deadline:  # and in the store: epoch 2 runs
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    client, run = only_run(killed_uri)
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"  # nothing could mark it: the process died at once
    assert [step for step, _ in history(client, run_id)] == [1]
    shutil.rmtree(checkpoints)  # another checkout: only the tracking store is shared

    resumed = run_train([f"resume={run_id}", f"tracking.uri={killed_uri}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run_id}" in resumed.stdout
    train(compose_train([*args, f"tracking.uri={clean_uri}"]))  # never killed (in this process: no second start-up)

    client, run = only_run(killed_uri)
    clean_client, clean_run = only_run(clean_uri)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == "1" and "error" not in run.data.tags
    for key in ("loss", "val_accuracy"):
        steps, values = zip(*history(client, run_id, key), strict=True)
        clean_steps, clean_values = zip(*history(clean_client, clean_run.info.run_id, key), strict=True)
        assert steps == clean_steps == (1, 2, 3)
        np.testing.assert_allclose(values, clean_values, rtol=0, atol=1e-6)
    weights, clean_weights = final_weights(killed_uri, run_id), final_weights(clean_uri, clean_run.info.run_id)
    for w, c in zip(weights, clean_weights, strict=True):
        np.testing.assert_allclose(w, c, rtol=0, atol=1e-6)
    print("max weight difference:", max(float(np.abs(w - c).max()) for w, c in zip(weights, clean_weights,
                                                                                    strict=True)))


def test_a_kept_interrupt_is_raised_at_the_blocks_end_and_a_second_one_at_once(monkeypatch):
    monkeypatch.setattr(lifecycle, "received", None)
    with pytest.raises(KeyboardInterrupt) as first, interrupts_kept():
        os.kill(os.getpid(), signal.SIGINT)
        assert lifecycle.received == signal.SIGINT  # kept: the block goes on
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # a handler that does not raise stays
    assert signal_of(first.value) == signal.SIGINT
    with pytest.raises(KeyboardInterrupt), interrupts_kept():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second Ctrl-C did not stop the block")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("more", [1, 2])
def test_ctrl_c_again_while_the_run_is_marked_killed(store_uri, monkeypatch, more):
    """One more Ctrl-C while the run's end is written is let go (the run ends KILLED, raised as Interrupted); the
    one after it is raised at once, so that an end that hangs can be cut short."""
    mlflow.set_tracking_uri(store_uri)
    real_end_run = mlflow.end_run

    def end_run_pressed(*args, **kwargs):
        for _ in range(more):
            os.kill(os.getpid(), signal.SIGINT)
        return real_end_run(*args, **kwargs)

    experiment_id = mlflow.create_experiment("lenet-lab")
    with pytest.raises(KeyboardInterrupt) as raised:
        with tracked_run(experiment_id, "interrupted", {}) as run:
            monkeypatch.setattr(mlflow, "end_run", end_run_pressed)
            raise KeyboardInterrupt
    monkeypatch.setattr(mlflow, "end_run", real_end_run)
    real_end_run()  # whatever the cut-short end left active
    stored = MlflowClient(store_uri).get_run(run.info.run_id)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if more == 1:
        assert isinstance(raised.value, Interrupted) and raised.value.exit_code == 130
        assert stored.info.status == "KILLED"
        assert stored.data.tags["error"] == "interrupted (signal SIGINT)"
    else:
        assert not isinstance(raised.value, Interrupted)


def test_a_signal_mid_epoch_stops_at_the_batch_end_keeps_whole_epochs_and_resumes_like_the_uninterrupted_run(
        tmp_path, monkeypatch):
    """SIGUSR2 (SLURM's warning) during epoch 2's third batch: training stops once that batch ends, the run is
    KILLED with epoch 1 alone logged and checkpointed, and its resume ends as the run that was never stopped."""
    args = [*QUICK, "trainer.epochs=3", "trainer.steps_per_execution=1", "seed=4"]  # 8 batches an epoch
    uri, clean_uri = (f"sqlite:///{tmp_path / name / 'mlflow.db'}" for name in ("stopped", "clean"))
    batches = []  # (epoch, batch, "begin" / "end"), 0-based

    def begin(self, batch, logs=None):
        batches.append((int(self.batches.epoch.numpy()), batch, "begin"))
        if batches[-1] == (1, 2, "begin"):
            os.kill(os.getpid(), signal.SIGUSR2)

    def end(self, batch, logs=None):
        batches.append((int(self.batches.epoch.numpy()), batch, "end"))

    handlers = {signum: signal.getsignal(signum) for signum in INTERRUPTS}
    monkeypatch.setattr(lifecycle, "received", None)
    catch_interrupts()
    try:
        with monkeypatch.context() as patch, pytest.raises(Interrupted) as stopped:
            patch.setattr(SetEpoch, "on_train_batch_begin", begin, raising=False)
            patch.setattr(SetEpoch, "on_train_batch_end", end, raising=False)
            train(compose_train([*args, f"tracking.uri={uri}"]))
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert batches[-2:] == [(1, 2, "begin"), (1, 2, "end")]  # the batch ran to its end, and no other began
    assert stopped.value.exit_code == 140
    client, run = only_run(uri)
    run_id = run.info.run_id
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted (signal SIGUSR2)"
    assert [step for step, _ in history(client, run_id)] == [1]
    with np.load(tmp_path / "stopped" / "checkpoints" / run_id / FILE) as saved:
        assert int(saved["epochs_done"]) == 1

    resumed = start(compose_train([f"resume={run_id}", f"tracking.uri={uri}"]), [f"resume={run_id}"], None)
    clean = train(compose_train([*args, f"tracking.uri={clean_uri}"]))
    client, run = only_run(uri)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "1"
    for key in ("loss", "val_accuracy"):
        steps, values = zip(*history(client, run_id, key), strict=True)
        clean_steps, clean_values = zip(*history(MlflowClient(clean_uri), clean.run_id, key), strict=True)
        assert steps == clean_steps == (1, 2, 3)
        np.testing.assert_allclose(values, clean_values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed.test_loss, clean.test_loss, rtol=0, atol=1e-6)


def test_a_killed_run_resumes_with_more_epochs_in_process(store_uri):
    first = train(compose_train([*QUICK, "trainer.epochs=1", f"tracking.uri={store_uri}"]))
    client = MlflowClient(store_uri)
    client.set_terminated(first.run_id, "KILLED")
    cfg = compose_train([f"resume={first.run_id}", "trainer.epochs=2", f"tracking.uri={store_uri}"])
    result = start(cfg, [f"resume={first.run_id}", "trainer.epochs=2"], None)
    assert result.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert [step for step, _ in history(client, first.run_id)] == [1, 2]
    assert "epochs: 2" in mlflow.artifacts.load_text(f"runs:/{first.run_id}/config.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["trainer.batch_size=64"], "trainer.batch_size=64 would change the experiment"),
    (["model=simple_conv"], "model=simple_conv would change the experiment"),
    (["trainer.epochs=1"], "trainer.epochs may only grow on resume: the run has 2, got 1"),
])
def test_resume_refuses_overrides_that_change_the_experiment(store_uri, overrides, message):
    run = train(compose_train([*QUICK, "trainer.epochs=2", f"tracking.uri={store_uri}"]))
    MlflowClient(store_uri).set_terminated(run.run_id, "FAILED")
    args = [f"resume={run.run_id}", *overrides]
    with pytest.raises(UserError, match=message):
        start(compose_train([*args, f"tracking.uri={store_uri}"]), args, None)


def test_resume_refuses_unknown_finished_and_live_runs(store_uri):
    run = train(compose_train([*QUICK, "trainer.epochs=1", f"tracking.uri={store_uri}"]))
    for run_id, message in [("nope", "resume=nope: no such run"),
                            (run.run_id, f"resume={run.run_id}: the run is FINISHED")]:
        with pytest.raises(UserError, match=message):
            start(compose_train([f"resume={run_id}", f"tracking.uri={store_uri}"]), [f"resume={run_id}"], None)
    client = MlflowClient(store_uri)
    live = client.create_run(client.get_experiment_by_name("lenet-lab").experiment_id, tags=process_tags())
    with pytest.raises(UserError, match=f"the run is RUNNING \\(process {os.getpid()} on "):
        start(compose_train([f"resume={live.info.run_id}", f"tracking.uri={store_uri}"]),
              [f"resume={live.info.run_id}"], None)


def test_runs_of_dead_processes_on_this_host_are_marked_killed(store_uri):
    mlflow.set_tracking_uri(store_uri)
    client = MlflowClient(store_uri)
    experiment_id = client.create_experiment("lenet-lab")
    gone = subprocess.Popen(["true"])
    gone.wait()
    host = socket.gethostname()
    dead = client.create_run(experiment_id, tags={"host": host, "pid": str(gone.pid), "pid_started": "1"})
    alive = client.create_run(experiment_id, tags=process_tags())
    elsewhere = client.create_run(experiment_id, tags={"host": "another-host", "pid": str(gone.pid)})
    reused = client.create_run(experiment_id, tags={**process_tags(), "pid_started": "12345"})  # pid reused since
    assert sorted(mark_dead_runs(client, [experiment_id])) == sorted([dead.info.run_id, reused.info.run_id])
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(dead.info.run_id).data.tags["error"] == f"process {gone.pid} on {host} disappeared"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, store_uri, monkeypatch):
    cfg = compose_train([*QUICK, "trainer.epochs=1", f"tracking.uri={store_uri}"])
    run_id = train(cfg).run_id
    checkpoints = Checkpoints(checkpoint_dir(cfg.tracking, run_id))
    before = checkpoints.path.read_bytes()

    def killed_mid_write(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr("experiments.run.checkpoints.np.savez", killed_mid_write)
    model = load_model(runs_uri(run_id)).model
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(model, epochs_done=2)
    assert checkpoints.path.read_bytes() == before
    with np.load(checkpoints.path) as saved:
        assert int(saved["epochs_done"]) == 1


def test_a_diverging_loss_stops_the_run_failed_at_once(tmp_path, store_uri):
    result = run_train([*QUICK, "trainer.epochs=3", "optimizer=sgd", "optimizer.learning_rate=1e6",
                        f"tracking.uri={store_uri}"], tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss became nan at epoch 1, step ") and "Traceback" not in result.stderr
    client, run = only_run(store_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("Diverged: loss became nan at epoch 1, step ")
    assert history(client, run.info.run_id) == []  # stopped inside the first epoch
    with pytest.raises(Diverged):
        train(compose_train([*QUICK, "optimizer=sgd", "optimizer.learning_rate=1e6", f"tracking.uri={store_uri}"]))


def test_an_artifact_folder_that_cannot_be_written_fails_the_run_in_one_line(tmp_path, store_uri):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the artifact folder should be")
    client = MlflowClient(store_uri)
    client.create_experiment("lenet-lab", artifact_location=(blocker / "mlruns").as_uri())
    result = run_train([*QUICK, "trainer.epochs=1", f"tracking.uri={store_uri}"], tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(blocker) in last and "Traceback" not in result.stderr
    _, run = only_run(store_uri)
    assert run.info.status == "FAILED" and str(blocker) in run.data.tags["error"]
