"""Resuming a sweep with sweep_resume=: finished jobs skipped, the interrupted one continued in its own
run, the missing ones run, all under the same parent run; refused in one line when it cannot be done."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from experiments import PROJECT_ROOT
from experiments.apps.train import start
from experiments.errors import UserError
from experiments.run.checkpoints import ARTIFACT_DIR, FILE
from experiments.run.sweep import JOB_TAG, Sweep, earlier_run, job_identity, resume_sweep
from experiments.run.training import train
from experiments.store.runs import process_tags
from experiments.store.tracking import setup_experiment
from tests.conftest import compose_train, free_port, run_train

SMALL = ["data.train_size=2000", "data.test_size=200", "trainer.epochs=2", "data.val_size=500",
         "trainer.plots=False"]  # a boolean as Hydra's sweeper writes it back into the job's overrides
JOBS = [["model=lenet", "seed=0"], ["model=lenet", "seed=1"], ["model=simple_conv", "seed=0"],
        ["model=simple_conv", "seed=1"]]  # in the order Hydra runs -m model=lenet,simple_conv seed=0,1


def sweep_runs(uri):
    """The sweep's parent run and its children, by job in JOBS order."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    children = {r.data.tags[JOB_TAG]: r for r in runs if r is not parent}
    assert len(children) == len(runs) - 1, "two runs of one job"
    return client, parent, children


def history(client, run_id, key="loss"):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_a_jobs_identity_is_what_it_trains_not_where_it_is_stored_or_how_it_was_started():
    overrides = ["seed=1", "tracking.uri=sqlite:///a.db", "model=lenet", "sweep_resume=20250101-120000-abc123",
                 "+trainer.extra=2", "tracking.experiment=x"]
    assert job_identity(overrides) == "+trainer.extra=2 model=lenet seed=1"
    assert job_identity(["model=lenet", "seed=1"]) == job_identity(["seed=1", "model=lenet", "tracking.uri=b"])


@pytest.fixture
def store_uri(store_uri):
    """conftest's new store, with the experiment and no runs."""
    setup_experiment(store_uri, "lenet-lab")
    return store_uri


def test_an_unknown_sweep_is_refused_in_one_line_before_any_job_runs(tmp_path, store_uri):
    result = run_train(["-m", "seed=0,1", "sweep_resume=20990101-000000-nope00", f"tracking.uri={store_uri}"],
                       tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: sweep_resume=20990101-000000-nope00: no sweep with that id (or parent run id) in experiment "
        f"'lenet-lab' at {store_uri}.")
    assert "Traceback" not in result.stderr
    client = MlflowClient(store_uri)
    assert client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id]) == []


def test_a_sweep_whose_tracking_server_does_not_answer_stops_in_one_line_before_any_job_runs(tmp_path):
    """Was: Hydra turned the sweep callback's error into a warning and ran the jobs, which failed with a traceback."""
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_train(["-m", "seed=0,1", f"tracking.uri={uri}"], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: tracking.uri {uri}: no MLflow server answers (Connection refused)."]
    assert not (tmp_path / "multirun").exists()  # no job ran


def test_sweep_resume_without_a_sweep_is_refused():
    args = ["sweep_resume=20250101-120000-abc123"]
    with pytest.raises(UserError, match="sweep_resume=20250101-120000-abc123 resumes a sweep: give it with -m"):
        start(compose_train(args), args, None)


@pytest.fixture
def sweep(store_uri):
    """A stopped sweep's parent run, as the client, experiment id and Sweep; children are added by tests."""
    experiment_id = setup_experiment(store_uri, "lenet-lab")
    client = MlflowClient(store_uri)
    parent = client.create_run(experiment_id, tags={"sweep_id": "s1", "sweep_parent": "true"})
    client.set_terminated(parent.info.run_id, "KILLED")
    return client, experiment_id, Sweep("s1", parent.info.run_id)


def child(client, experiment_id, sweep, job, status, tags=None):
    tags = {"mlflow.parentRunId": sweep.parent_run_id, "sweep_id": sweep.sweep_id, JOB_TAG: job_identity(job),
            **(tags or {})}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def test_a_sweep_with_a_run_still_running_is_not_resumed(sweep):
    client, experiment_id, stopped = sweep
    live = child(client, experiment_id, stopped, JOBS[0], "RUNNING", tags=process_tags())  # this very process
    with pytest.raises(UserError, match=f"sweep_resume=s1: its run {live} is still RUNNING \\(process {os.getpid()}"):
        resume_sweep(client, experiment_id, "s1")
    assert client.get_run(stopped.parent_run_id).info.status == "KILLED"
    client.set_terminated(live, "KILLED")
    assert resume_sweep(client, experiment_id, stopped.parent_run_id) == stopped  # by parent run id too
    assert client.get_run(stopped.parent_run_id).info.status == "RUNNING"


def test_a_jobs_earlier_run_is_kept_when_finished_or_checkpointed_and_replaced_without_checkpoint(sweep, tmp_path):
    client, experiment_id, stopped = sweep
    tracking = compose_train([f"tracking.uri={client.tracking_uri}"]).tracking
    finished = child(client, experiment_id, stopped, JOBS[0], "FINISHED")
    child(client, experiment_id, stopped, JOBS[0], "KILLED")  # the same job twice in the sweep: the finished run
    checkpointed = child(client, experiment_id, stopped, JOBS[1], "KILLED")
    (tmp_path / FILE).write_bytes(b"weights")
    client.log_artifact(checkpointed, str(tmp_path / FILE), ARTIFACT_DIR)
    empty = child(client, experiment_id, stopped, JOBS[2], "FAILED")

    assert earlier_run(client, stopped, [*JOBS[0], "sweep_resume=s1"], tracking).info.run_id == finished
    assert earlier_run(client, stopped, JOBS[1], tracking).info.run_id == checkpointed
    assert earlier_run(client, stopped, JOBS[2], tracking) is None
    assert client.get_run(empty).info.lifecycle_stage == "deleted"
    assert earlier_run(client, stopped, JOBS[3], tracking) is None


@pytest.mark.slow
def test_a_sweep_killed_in_job_3_resumes_without_training_jobs_1_and_2_again(tmp_path):
    """kill -9 of the whole sweep while job 3 trains, then the same command with sweep_resume=: jobs 1
    and 2 skipped, job 3 continued in its run (ending as an uninterrupted run), job 4 run."""
    store = tmp_path / "store"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    args = ["-m", "model=lenet,simple_conv", "seed=0,1", *SMALL, f"tracking.uri={uri}"]
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), *args, f"hydra.sweep.dir={tmp_path}/killed"]
    process = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(store.glob(f"checkpoints/*/{FILE}"))) < 3:  # job 3 finished epoch 1: epoch 2 runs
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    client, parent, runs = sweep_runs(uri)
    jobs = [job_identity(job + SMALL) for job in JOBS]
    assert sorted(runs) == sorted(jobs[:3]) and parent.info.status == "RUNNING"
    assert [runs[job].info.status for job in jobs[:3]] == ["FINISHED", "FINISHED", "RUNNING"]
    done_before = {job: (runs[job].info.run_id, runs[job].info.end_time, runs[job].data.metrics["train_seconds"])
                   for job in jobs[:2]}
    killed_id = runs[jobs[2]].info.run_id
    with np.load(store / "checkpoints" / killed_id / FILE) as saved:
        epochs_done = int(saved["epochs_done"])

    resumed = run_train([*args, f"sweep_resume={parent.data.tags['sweep_id']}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run_id, _, _ in done_before.values():
        assert f"skipped: run {run_id} " in resumed.stdout
    assert f"resuming run {killed_id} " in resumed.stdout

    client, parent_after, runs = sweep_runs(uri)
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    assert sorted(runs) == sorted(jobs)
    assert all(run.info.status == "FINISHED" for run in runs.values())
    for job, before in done_before.items():  # not trained again
        run = runs[job]
        assert (run.info.run_id, run.info.end_time, run.data.metrics["train_seconds"]) == before
        assert [step for step, _ in history(client, run.info.run_id)] == [1, 2]
    job_3 = runs[jobs[2]]
    assert job_3.info.run_id == killed_id and job_3.data.tags["resumed_from_epoch"] == str(epochs_done)
    assert "error" not in job_3.data.tags

    train(compose_train(["model=simple_conv", "seed=0", *SMALL, f"tracking.uri=sqlite:///{tmp_path}/clean/mlflow.db"]))
    clean_client = MlflowClient(f"sqlite:///{tmp_path}/clean/mlflow.db")
    (clean_run,) = clean_client.search_runs([clean_client.get_experiment_by_name("lenet-lab").experiment_id])
    for key in ("loss", "val_accuracy"):
        assert history(client, killed_id, key) == history(clean_client, clean_run.info.run_id, key)
    assert job_3.data.metrics["test_accuracy"] == clean_run.data.metrics["test_accuracy"]
