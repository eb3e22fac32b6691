"""Sweeps through hydra-ray-launcher (the `cluster` extra): the test starts a Ray cluster on this machine as
`ray start --head` starts one on a cluster's head node, and `hydra/launcher=ray` runs every job of a sweep
on it as a Ray task, in a worker process of the cluster's own."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.run.sweep import PARENT_RUN_VAR
from tests.conftest import finished_sweep, free_port, log_tail, run_train, stop_group, wait_until

pytest.importorskip("hydra_plugins.hydra_ray_launcher",
                    reason="hydra-ray-launcher is missing: pip install -e '.[cluster]' (make test installs it)")

SEEDS = ["0", "1", "2"]  # one job more than the cluster has CPUs: the third waits for a free one
# Ray on one machine: every address on the loopback interface (Ray's own switch for single-machine clusters;
# otherwise it binds and connects to the machine's network address), and no usage report.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def descendants(pid: int) -> set[int]:
    """The processes below ``pid`` (Linux /proc): Ray's workers run in process groups of their own."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), set()).add(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        children = parents.get(todo.pop(), set()) - found
        found |= children
        todo.extend(children)
    return found


def wait_started(proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until ``ray start`` says the cluster is up; fails with its log when it exits or takes too long."""
    try:
        wait_until(lambda: "Ray runtime started" in log_tail(log, 100_000), timeout, "ray start", proc, log, 1)
    except BaseException:
        stop_group(proc)
        raise


@pytest.fixture
def ray_cluster():
    """A 2-CPU Ray head node on localhost, every port free-picked, in a temp folder short enough for Ray's
    socket paths; yields (address, temp folder). Stopped by process group and by the ids of its workers
    (never `ray stop`, which stops every Ray process of the machine)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    env = {**os.environ, **RAY_ENV,
           "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}
    ports = ["ray-client-server", "dashboard", "dashboard-agent-listen", "runtime-env-agent", "metrics-export"]
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
           "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *(f"--{name}-port={free_port()}" for name in ports)]
    log = temp_dir / "ray_start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_started(proc, log)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        family = descendants(proc.pid)
        stop_group(proc, timeout=5)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.scale
def test_a_ray_sweep_runs_each_job_as_a_task_on_the_cluster_under_one_parent(tmp_path, tracking_uri, ray_cluster):
    address, ray_dir = ray_cluster
    result = run_train(["-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={address}",
                        f"seed={','.join(SEEDS)}", "debug=tiny",
                        f"tracking.uri={tracking_uri}"], tmp_path, env=RAY_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Connecting to existing Ray cluster at address: {address}" in result.stderr  # not a Ray of its own

    children = finished_sweep(tracking_uri, SEEDS)
    assert len({r.data.tags["pid"] for r in children}) == len(SEEDS)  # max_calls: 1, a worker process per job
    # each job ran in a worker of the cluster: the cluster's log of that worker names the run its job logged
    for run in children:
        [worker_log] = (ray_dir / "session_latest" / "logs").glob(f"worker-*-{run.data.tags['pid']}.out")
        assert f"MLflow run id: {run.info.run_id}" in worker_log.read_text()

    # the parent run's id reached the jobs in their config, not in a file of the sweep folder
    sweep = tmp_path / "multirun"
    assert not list(sweep.rglob("*.json"))
    parent_id = children[0].data.tags["mlflow.parentRunId"]
    assert all(OmegaConf.load(sweep / str(job) / ".hydra" / "hydra.yaml").hydra.job.env_set[PARENT_RUN_VAR]
               == parent_id for job in range(len(SEEDS)))
