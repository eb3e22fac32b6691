"""Sweeps on a real SLURM cluster: a single-node cluster on localhost (Debian's slurm-wlm and munge, started by
a fixture from a temporary folder) runs `python train.py -m hydra/launcher=submitit_slurm ...` through
hydra-submitit-launcher; every job finds its sweep's parent run through its own config (no file of the
submitting machine), and a job the scheduler cancels or warns of its time limit ends KILLED."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import OmegaConf

from experiments import PROJECT_ROOT
from experiments.run import lifecycle
from experiments.run.lifecycle import INTERRUPTS, Interrupted, catch_interrupts, tracked_run
from experiments.run.sweep import PARENT_RUN_VAR, SWEEP_ID_VAR
from experiments.run.sweep_callback import SweepCallback
from tests.conftest import CONF_DIR, finished_sweep, free_port, log_tail, run_train, stop_group, wait_until

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is missing: pip install -e '.[cluster]' (make test installs it)")

SBIN = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
PARTITION = "lenetlab"
JOB = ["hydra/launcher=submitit_slurm", f"hydra.launcher.partition={PARTITION}", "hydra.launcher.cpus_per_task=1",
       "hydra.launcher.timeout_min=10"]  # two 1-CPU jobs at once on the 2-CPU node


# --- A single-node SLURM cluster on localhost -------------------------------------------------------------------


@dataclass
class Cluster:
    folder: Path
    conf: Path
    env: dict[str, str]  # SLURM_CONF for sbatch / squeue / scancel and for the sweep that submits

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30, check=True).stdout


def slurm_conf(folder: Path, host: str, munge_socket: Path) -> str:
    """slurm.conf for one node (this host, 2 CPUs) whose daemons run as root, every path in ``folder``."""
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""\
ClusterName=lenetlab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start_munged(folder: Path) -> tuple[subprocess.Popen, Path]:
    """munged in the foreground with its own key and socket; returns it and its socket."""
    (folder / "munge").mkdir(mode=0o755)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = folder / "munge" / "munge.socket"
    files = [f"--socket={socket_path}", f"--key-file={key}", f"--pid-file={folder}/munge/munged.pid",
             f"--log-file={folder}/munged.log", f"--seed-file={folder}/munge/seed"]
    proc = subprocess.Popen(
        [shutil.which("munged", path=SBIN), "--foreground", "--force", *files],
        stdout=subprocess.DEVNULL, stderr=open(folder / "munged.err", "w"), start_new_session=True)
    return proc, socket_path


def start_daemon(name: str, cluster: Cluster) -> subprocess.Popen:
    """slurmctld or slurmd in the foreground on the cluster's slurm.conf."""
    return subprocess.Popen([shutil.which(name, path=SBIN), "-D", "-f", str(cluster.conf)], env=cluster.env,
                            stdout=subprocess.DEVNULL, stderr=open(cluster.folder / f"{name}.err", "w"),
                            start_new_session=True)


def wait_until_idle(cluster: Cluster, daemons: list[subprocess.Popen], timeout: float = 60) -> str | None:
    """None once ``sinfo`` shows the node idle, else why not (a daemon exited, or the time ran out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc in daemons):
            return "a daemon exited"
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=cluster.env, capture_output=True, text=True)
        if state.stdout.strip() == "idle":
            return None
        time.sleep(0.5)
    return f"the node was not idle after {timeout:.0f} s"


def processes_of(conf: Path) -> list[int]:
    """The processes whose environment names this cluster's slurm.conf: its daemons, their job steps, the jobs and
    the sweeps submitted to it (all started for this test)."""
    marker = f"SLURM_CONF={conf}".encode()
    found = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc_dir / "environ").read_bytes().split(b"\0"):
                found.append(int(proc_dir.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def tear_down(cluster: Cluster, daemons: list[subprocess.Popen]) -> None:
    """Cancel every job, stop the daemons, then kill whatever of the cluster's processes is left."""
    if daemons[1].poll() is None:  # slurmctld
        subprocess.run(["scancel", "--user", "root"], env=cluster.env, capture_output=True, timeout=30)
    for proc in reversed(daemons):
        stop_group(proc)
    for pid in processes_of(cluster.conf):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node cluster; skipped (with the reason) where slurm-wlm or munge is missing or
    cannot start."""
    missing = [name for name in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(name, path=SBIN)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root (SlurmUser=root): run the SLURM tests as root")
    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    munged, munge_socket = start_munged(folder)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, socket.gethostname().split(".")[0], munge_socket))
    cluster = Cluster(folder, conf, {**os.environ, "SLURM_CONF": str(conf)})
    daemons = [munged, start_daemon("slurmctld", cluster), start_daemon("slurmd", cluster)]
    try:
        why = wait_until_idle(cluster, daemons)
        if why:
            logs = "\n".join(f"--- {name}\n{log_tail(folder / name, 1500)}"
                             for name in ("munged.log", "slurmctld.log", "slurmd.log", "slurmd.err"))
            pytest.skip(f"the SLURM cluster (slurm-wlm + munge on localhost) could not start: {why}\n{logs}")
        yield cluster
    finally:
        tear_down(cluster, daemons)


# --- The tests ---------------------------------------------------------------------------------------------------


def sweep_runs(uri: str):
    """The sweep's parent run and its child runs by seed."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    return client, parents, {r.data.params.get("seed"): r for r in runs if r not in parents}


@pytest.mark.scale
def test_every_job_config_of_a_sweep_names_its_sweep_and_parent_run(store_uri):
    """Hydra's launchers compose each job's config from the sweep's overrides: the callback's ids are in it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        sweep_cfg = loader.load_configuration("train", ["seed=0,1", f"tracking.uri={store_uri}"],
                                              run_mode=RunMode.MULTIRUN)
        callback = SweepCallback()
        callback.on_multirun_start(sweep_cfg)
        job_cfg = loader.load_sweep_config(sweep_cfg, ["seed=1", f"tracking.uri={store_uri}"])

    sweep = callback.sweep
    assert OmegaConf.to_container(job_cfg.hydra.job.env_set) == {SWEEP_ID_VAR: sweep.sweep_id,
                                                                  PARENT_RUN_VAR: sweep.parent_run_id}
    assert job_cfg.seed == 1 and list(job_cfg.hydra.overrides.task) == ["seed=1", f"tracking.uri={store_uri}"]
    parent = MlflowClient(store_uri).get_run(sweep.parent_run_id)
    assert parent.data.tags["sweep_parent"] == "true" and parent.data.tags["sweep_id"] == sweep.sweep_id


@pytest.mark.slow
@pytest.mark.scale
def test_a_submitit_slurm_sweep_runs_each_job_as_a_slurm_job_under_one_parent(slurm, tmp_path, tracking_uri):
    result = run_train(["-m", *JOB, "seed=0,1", "debug=tiny", f"tracking.uri={tracking_uri}"],
                       tmp_path, env={"SLURM_CONF": str(slurm.conf)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    children = finished_sweep(tracking_uri, ["0", "1"])

    # each job was one task of a SLURM job array; its log (srun's output) in the sweep folder names its run
    sweep = tmp_path / "multirun"
    [script] = sweep.glob(".submitit/*/*_submission.sh")
    assert f"#SBATCH --partition={PARTITION}" in script.read_text()
    logs = sorted(sweep.glob(".submitit/*_*/*_0_log.out"))
    assert [log.name.split("_")[1] for log in logs] == ["0", "1"]  # <array job>_<index>_0_log.out
    logged = {line.split(": ")[1] for log in logs for line in log.read_text().splitlines()
              if line.startswith("MLflow run id: ")}
    assert logged == {r.info.run_id for r in children}
    assert all("JobEnvironment(job_id=" in log.read_text() for log in logs)

    # the parent run's id reached the jobs in their config, not in a file of the sweep folder
    assert not list(sweep.rglob("*.json"))
    for job in ("0", "1"):
        env_set = OmegaConf.load(sweep / job / ".hydra" / "hydra.yaml").hydra.job.env_set
        assert env_set[PARENT_RUN_VAR] == children[0].data.tags["mlflow.parentRunId"]


@pytest.mark.scale
def test_a_signal_that_library_code_turns_into_another_error_still_ends_the_run_killed(store_uri, monkeypatch):
    """TensorFlow, interrupted while it traces a tf.data function, raises AttributeError in place of the signal
    handler's KeyboardInterrupt (seen here under scancel): the run is KILLED all the same, not FAILED."""
    handlers = {signum: signal.getsignal(signum) for signum in INTERRUPTS}
    monkeypatch.setattr(lifecycle, "received", None)
    mlflow.set_tracking_uri(store_uri)
    client = MlflowClient(store_uri)
    experiment_id = client.create_experiment("lenet-lab")
    catch_interrupts()
    try:
        with pytest.raises(Interrupted) as stopped, tracked_run(experiment_id, "job", {}) as run:
            try:
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(5)
            except KeyboardInterrupt:
                raise AttributeError("'dict' object has no attribute '_type_spec'") from None
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert stopped.value.exit_code == 140
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and ended.data.tags["error"] == "interrupted (signal SIGUSR2)"


def runs_unless_busy(uri: str):
    """``sweep_runs``, or None while the sqlite store stays locked past MLflow's 20 s busy timeout: two jobs
    logging every few hundred milliseconds on a loaded machine can keep a polling reader out that long (seen
    once in CI); the next poll reads again."""
    try:
        return sweep_runs(uri)
    except MlflowException as error:
        if "database is locked" not in str(error):
            raise
        return None


@pytest.mark.slow
@pytest.mark.scale
def test_a_job_the_scheduler_cancels_or_warns_of_its_time_limit_ends_killed(slurm, tmp_path, tracking_uri):
    """scancel sends SIGTERM to the job's processes (SIGKILL KillWait=30 s later); SLURM's warning before the time
    limit is the SIGUSR2 that submitit asks for (--signal=USR2@<s>), sent here with scancel --signal."""
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), "-m", *JOB, "seed=0,1", "debug=tiny", "trainer.epochs=200",
           f"tracking.uri={tracking_uri}", f"hydra.sweep.dir={tmp_path}/multirun"]
    log = tmp_path / "sweep.log"
    sweep = subprocess.Popen(cmd, cwd=tmp_path, env=slurm.env, stdout=log.open("w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def running():  # both jobs have their runs: our signal handlers are in place
            runs = runs_unless_busy(tracking_uri)
            return runs and len([r for r in runs[2].values() if r.info.status == "RUNNING"]) == 2

        wait_until(lambda: "MLflow sweep " in log.read_text(), 60, "parent run", sweep, log, 0.5)  # the store exists
        wait_until(running, 120, "two runs", sweep, log, 0.5)
        jobs = sorted(slurm.run("squeue", "-h", "-o", "%i").split())
        assert [job.split("_")[1] for job in jobs] == ["0", "1"], jobs  # array tasks, in seed order
        slurm.run("scancel", jobs[0])
        slurm.run("scancel", "--signal=USR2", jobs[1])

        def ended():  # the runs, then the parent (the jobs end it after their runs)
            if (runs := runs_unless_busy(tracking_uri)) is None:
                return None
            _, parents, children = runs
            return all(r.info.status != "RUNNING" for r in [*parents, *children.values()]) and (parents, children)

        [parent], children = wait_until(ended, 60, "end of both runs and the parent", sweep, log, 0.5)
    finally:
        stop_group(sweep)  # without accounting (sacct), submitit cannot learn that a cancelled job is over

    assert children["0"].info.status == children["1"].info.status == "KILLED", {
        seed: (r.info.status, r.data.tags.get("error")) for seed, r in children.items()}
    assert children["0"].data.tags["error"] == "interrupted (signal SIGTERM)"
    assert children["1"].data.tags["error"] == "interrupted (signal SIGUSR2)"
    assert parent.info.status == "KILLED"
    errs = {path.name.split("_")[1]: path.read_text() for path in (tmp_path / "multirun").glob(".submitit/*_*/*.err")}
    assert f"interrupted: run {children['0'].info.run_id} marked KILLED" in errs["0"]
    assert f"interrupted: run {children['1'].info.run_id} marked KILLED" in errs["1"]
