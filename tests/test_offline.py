"""A tracking server that is down or goes away: fail fast before training, never block training,
lose nothing — a real `mlflow server` killed and restarted on the same port."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from experiments import PROJECT_ROOT
from tests.conftest import free_port, run_train, stop_group, wait_for_health, wait_until

MLFLOW = PROJECT_ROOT / ".venv" / "bin" / "mlflow"
EPOCHS = 20  # of 256 images, ~0.15 s each over HTTP: training must outlast the server going away
AWAY_AT_END_EPOCHS = 10


def start_server(store: Path, port: int, log: Path, timeout: float = 120) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over the sqlite store and artifact folder in ``store``: one worker and no
    job queue (MLflow's GenAI jobs, unused by runs), which starts in half the time of the default four workers and
    seven job processes."""
    command = [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
               "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=store, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                start_new_session=True)
    try:
        wait_for_health(proc, f"http://127.0.0.1:{port}", log, "mlflow server", timeout)
    except BaseException:
        stop_group(proc)
        raise
    return proc


def test_a_server_that_is_down_fails_before_training_in_one_line(tmp_path):
    port = free_port()
    started = time.monotonic()
    result = run_train([f"tracking.uri=http://127.0.0.1:{port}", "trainer.epochs=1"], tmp_path)
    assert time.monotonic() - started < 30  # the check itself: at most 5 s; the rest is importing TensorFlow
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: tracking.uri http://127.0.0.1:{port}: no MLflow server answers (Connection refused).")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["compare.py", "predict.py images=digit.png"])
def test_every_command_fails_fast_on_a_server_that_is_down(tmp_path, command):
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    port = free_port()
    started = time.monotonic()
    script, *args = command.split()
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / script), *args,
                             f"tracking.uri=http://127.0.0.1:{port}", f"hydra.run.dir={tmp_path}/hydra"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"error: tracking.uri http://127.0.0.1:{port}: no MLflow server answers "
                             "(Connection refused).\n")


def wait_for_epoch(client: MlflowClient, proc: subprocess.Popen, step: int, timeout: float = 300) -> str:
    """The run id, once the (only) run of experiment lenet-lab has logged val_accuracy for ``step``."""

    def logged() -> str | None:
        experiment = client.get_experiment_by_name("lenet-lab")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and any(m.step >= step for m in client.get_metric_history(runs[0].info.run_id, "val_accuracy")):
            return runs[0].info.run_id
        return None

    return wait_until(logged, timeout, f"epoch {step} of the run", proc)


def wait_for_queued_epoch(outbox: Path, proc: subprocess.Popen, timeout: float = 300) -> set[int]:
    """The steps of the epochs whose val_accuracy waits in the run's outbox (``experiments.store.offline``), once
    there is one: an epoch ended while the server was away (training must not end first: give it more epochs)."""

    def queued() -> set[int]:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):  # not there yet, or being written
            items = json.loads((outbox / "queue.json").read_text())["items"]
            return {item["step"] for item in items if "val_accuracy" in item.get("metrics", {})}
        return set()

    return wait_until(queued, timeout, f"an epoch queued in {outbox}", proc, interval=0.05)


def train_process(uri: str, tmp_path: Path, epochs: int) -> subprocess.Popen:
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=tiny", "trainer.plots=true",
           f"trainer.epochs={epochs}", f"tracking.uri={uri}", f"tracking.local_dir={tmp_path}/local",
           f"hydra.run.dir={tmp_path}/hydra"]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_complete(client: MlflowClient, run_id: str, epochs: int) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "val_accuracy", "epoch_seconds"):
        assert [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)] == list(
            range(1, epochs + 1)), key
    assert {"test_accuracy", "test_loss", "train_seconds"} <= set(run.data.metrics)
    assert len(client.list_artifacts(run_id, "plots")) == 6
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/checkpoint.npz"]
    assert len(run.outputs.model_outputs) == 1
    assert run.data.tags["mlflow.note.content"].startswith("lenet (builtin layers) on mnist")


@pytest.mark.slow
def test_a_server_that_goes_away_during_training_loses_nothing(tmp_path):
    """Killed in epoch 2 and back during training: the run finishes as if nothing happened. Killed
    again and away at the end: the process says where its data waits and how to send it; sent
    later, the run is complete and FINISHED."""
    store, log, port = tmp_path / "server", tmp_path / "server.log", free_port()
    store.mkdir()
    uri = f"http://127.0.0.1:{port}"
    client = MlflowClient(uri)

    server = start_server(store, port, log)
    training = train_process(uri, tmp_path, epochs=EPOCHS)
    try:
        run_id = wait_for_epoch(client, training, step=1)
        os.killpg(server.pid, signal.SIGTERM)  # the server goes; training is watched while it does
        queued = wait_for_queued_epoch(tmp_path / "local" / "pending" / run_id, training)  # nowhere to log to
        training.send_signal(signal.SIGSTOP)  # held while the server restarts, however long that takes
        assert training.poll() is None, "training ended while the server was away: give it more epochs"
        stop_group(server)
        server = start_server(store, port, log)
        training.send_signal(signal.SIGCONT)
        stdout, stderr = training.communicate(timeout=600)
        assert training.returncode == 0, stderr[-3000:]
        assert_complete(client, run_id, EPOCHS)  # the queued epochs among them
        assert queued <= {m.step for m in client.get_metric_history(run_id, "val_accuracy")}

        training = train_process(uri, tmp_path, epochs=AWAY_AT_END_EPOCHS)
        run_id = wait_for_epoch_of_new_run(client, training, run_id)
        # Held while the server goes: a fast machine must not finish the run before it is gone.
        training.send_signal(signal.SIGSTOP)
        assert training.poll() is None, "training ended before the server went away: give it more epochs"
        stop_group(server, timeout=0)  # it dies: stopped gracefully, it would wait for the held run's connection
        training.send_signal(signal.SIGCONT)
        stdout, stderr = training.communicate(timeout=600)
    finally:
        training.kill()
    assert training.returncode == 1, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: the tracking server {uri} did not come back; ") and "Traceback" not in stderr
    folder = Path(message.split("python -m experiments.store.offline ")[1])
    assert folder == tmp_path / "local" / "pending" / run_id
    try:
        queued = json.loads((folder / "queue.json").read_text())["items"]
        assert [item["kind"] for item in queued][-1] == "end"
        server = start_server(store, port, log)
        sent = subprocess.run([sys.executable, "-m", "experiments.store.offline", str(folder)], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0, sent.stderr[-3000:]
        assert f"sent {len(queued)} pending deliveries of run {run_id}" in sent.stdout
        assert_complete(client, run_id, AWAY_AT_END_EPOCHS)
        assert not (folder / "queue.json").exists()
    finally:
        stop_group(server)


def wait_for_epoch_of_new_run(client: MlflowClient, proc: subprocess.Popen, other_run_id: str,
                              timeout: float = 300) -> str:
    """The id of the run other than ``other_run_id``, once it has logged its first epoch."""

    def new_run() -> str | None:
        runs = client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
        new = [r for r in runs if r.info.run_id != other_run_id]
        return new[0].info.run_id if new and client.get_metric_history(new[0].info.run_id, "val_accuracy") else None

    return wait_until(new_run, timeout, "a new run with an epoch", proc)
