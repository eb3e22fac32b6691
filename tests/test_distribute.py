"""trainer.strategy: the same training on 2 replicas as on one device (mirrored over 2 logical CPUs, in a
subprocess that makes them before TensorFlow starts), a 2-worker multi_worker job of two train.py processes
on localhost logging one run, the SLURM cluster read from a job step's environment, a bad value."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from experiments import PROJECT_ROOT
from tests.conftest import free_port, log_tail, run_train, stop_group

pytestmark = pytest.mark.scale

# 90 steps: 3 epochs of 3,840 images in global batches of 128 (a multiple of 128: every batch splits evenly),
# at five times the default learning rate: enough to learn (> 90 %; 94.5 % measured) in few steps.
STEPS_90 = ["data.train_size=3840", "data.val_size=1000", "data.test_size=1000", "trainer.epochs=3",
            "optimizer.learning_rate=0.005", "trainer.plots=false"]
# The replicas sum their gradients in another order (2 x 64 images, then an all-reduce), and every Adam step
# carries the difference on: the builtin layers land within a few tenths of a percent of one device.
LOSS_RTOL = 0.03
ACCURACY_ABS = 0.01


MIRRORED_SCRIPT = """
import json, sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]  # before TensorFlow starts: 2 logical CPU devices
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from experiments.run.training import train
from tests.conftest import compose_train

uri, models, overrides = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
runs = {f"{model}/{strategy}": train(compose_train([f"model={model}", f"trainer.strategy={strategy}",
                                                    f"tracking.uri={uri}", *overrides])).run_id
        for model in models for strategy in ("auto", "mirrored")}
print(json.dumps(runs))
"""


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    """LeNet and its scratch twin, each trained 90 steps on one device (auto) and mirrored on 2 logical
    CPUs, same seed and global batch, in one process: (store URI, {"<model>/<strategy>": run id})."""
    tmp = tmp_path_factory.mktemp("mirrored")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MIRRORED_SCRIPT), uri, "lenet,lenet_scratch",
                           *STEPS_90], cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return uri, json.loads(proc.stdout.strip().splitlines()[-1])


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lenet", "lenet_scratch"])
def test_mirrored_on_two_cpus_lands_on_the_one_device_result(mirrored_runs, model):
    uri, runs = mirrored_runs
    client = MlflowClient(uri)
    one, two = (client.get_run(runs[f"{model}/{strategy}"]) for strategy in ("auto", "mirrored"))
    assert one.info.status == two.info.status == "FINISHED"
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        expected = history(client, one.info.run_id, key)
        assert len(expected) == 3
        assert history(client, two.info.run_id, key) == pytest.approx(expected, rel=LOSS_RTOL), key  # accuracy too
    assert two.data.metrics["test_loss"] == pytest.approx(one.data.metrics["test_loss"], rel=LOSS_RTOL)
    assert two.data.metrics["test_accuracy"] == pytest.approx(one.data.metrics["test_accuracy"], abs=ACCURACY_ABS)
    assert one.data.metrics["test_accuracy"] > 0.9  # it learned: the comparison is not between two failures


@pytest.mark.slow
def test_runs_log_their_strategy_and_replicas(mirrored_runs):
    uri, runs = mirrored_runs
    client = MlflowClient(uri)
    for strategy, replicas in (("auto", "1"), ("mirrored", "2")):
        run = client.get_run(runs[f"lenet/{strategy}"])
        assert run.data.params["trainer.strategy"] == strategy
        assert (run.data.tags["replicas"], run.data.tags["workers"]) == (replicas, "1")


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                       "task": {"type": "worker", "index": index}})


@pytest.mark.slow
def test_two_worker_job_on_localhost_logs_one_run(tmp_path):
    """Two train.py processes, worker 0 the chief: both finish, the store holds exactly one FINISHED run with
    every epoch's metrics, and only the chief kept a checkpoint."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    ports = [free_port()]
    while len(ports) < 2:
        ports += [port for port in [free_port()] if port not in ports]
    args = [sys.executable, str(PROJECT_ROOT / "train.py"), "data.train_size=2560", "data.val_size=500",
            "data.test_size=500", "trainer.epochs=2", "trainer.plots=false", "trainer.strategy=multi_worker",
            f"tracking.uri={uri}"]
    workers, logs = [], []
    for index in (0, 1):
        logs.append(tmp_path / f"worker{index}.log")
        env = {**os.environ, "TF_CONFIG": tf_config(ports, index)}
        with open(logs[-1], "w") as log:
            workers.append(subprocess.Popen([*args, f"hydra.run.dir={tmp_path}/hydra{index}"], cwd=tmp_path, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        codes = [worker.wait(timeout=400) for worker in workers]
    finally:
        for worker in workers:
            stop_group(worker)
    assert codes == [0, 0], log_tail(logs[0]) + log_tail(logs[1])
    assert "worker 1 of 2 workers: training with the chief" in logs[1].read_text()

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert f"MLflow run id: {run.info.run_id}" in logs[0].read_text()
    assert run.data.params["trainer.strategy"] == "multi_worker"
    assert (run.data.tags["replicas"], run.data.tags["workers"]) == ("2", "2")
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert run.data.metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert [p.name for p in (tmp_path / "store" / "checkpoints").iterdir()] == [run.info.run_id]


def test_a_slurm_job_step_is_the_cluster(monkeypatch):
    """Without TF_CONFIG, multi_worker reads the cluster from SLURM's variables of a 2-task step on two nodes
    (as srun sets them), with SlurmClusterResolver: task 1 is worker 1, not the chief."""
    from experiments.run.distribute import SLURM_PORT, cluster_resolver

    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2",
                        "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}.items():
        monkeypatch.setenv(name, value)
    resolver = cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": [f"node1:{SLURM_PORT}", f"node2:{SLURM_PORT}"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 1)


def test_a_bad_strategy_is_one_line(tmp_path):
    result = run_train(["trainer.strategy=horovod"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: trainer.strategy must be auto, mirrored or multi_worker, "
                                     "got 'horovod'.")
