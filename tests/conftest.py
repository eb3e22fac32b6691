import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments import PROJECT_ROOT  # noqa: E402

CONF_DIR = str(PROJECT_ROOT / "conf")

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # Started in the background by a non-interactive shell (`make test &` in a script), the tests and every process
    # they start would ignore Ctrl-C, and the tests of what Ctrl-C does fail: give SIGINT back its Python handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)

# conf/debug/small.yaml: a few thousand images and two epochs, enough to learn well above chance in seconds.
TINY = ["debug=small"]


def compose_train(overrides=()):
    """The resolved train.py config for the given overrides (no Hydra run)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A throwaway MLflow store: tests never touch the project's own mlflow.db / mlruns/."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An MLflow sqlite database with its tables and no runs: making one runs MLflow's schema migrations (about
    a second of CPU), copying it takes milliseconds."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("empty_store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store_uri(tracking_uri, empty_db) -> str:
    """``tracking_uri`` with its database already made (a copy of ``empty_db``), for tests that log runs but do
    not test how a store is first made (``tracking_uri`` itself stays a path where nothing exists yet)."""
    from experiments.store.tracking import sqlite_path

    shutil.copy(empty_db, sqlite_path(tracking_uri))
    return tracking_uri


@pytest.fixture(autouse=True)
def no_project_store(tmp_path_factory, monkeypatch):
    """Safety net: whatever a test forgets to point elsewhere lands in a temporary store."""
    import mlflow

    fallback = f"sqlite:///{tmp_path_factory.mktemp('fallback_store') / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fallback)
    mlflow.set_tracking_uri(fallback)
    yield
    mlflow.set_tracking_uri(fallback)


def train_in_store(store_dir: Path, runs: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    """Train each named list of overrides in-process into a new sqlite store in store_dir; returns
    the store's URI and the run id of each name."""
    from experiments.run.training import train

    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    return uri, {name: train(compose_train([*overrides, f"tracking.uri={uri}"])).run_id
                 for name, overrides in runs.items()}


@pytest.fixture
def store(trained):
    """The test module's ``trained`` (uri, runs), as this test's MLflow tracking URI."""
    import mlflow

    mlflow.set_tracking_uri(trained[0])
    return trained


def run_train(args, tmp_path: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` from an unrelated directory, Hydra's outputs in tmp_path."""
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), *args,
           f"hydra.run.dir={tmp_path}/hydra", f"hydra.sweep.dir={tmp_path}/multirun"]
    env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


# --- servers the tests start ---------------------------------------------------------------------------

HUEY_STORAGE_VAR = b"_MLFLOW_HUEY_STORAGE_PATH"  # mlflow.server.constants.HUEY_STORAGE_PATH_ENV_VAR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def huey_storage_dirs(pgid: int) -> set[Path]:
    """The job-queue directories the server made (tempfile.mkdtemp in /dev/shm, never removed by MLflow),
    read from the environment of the processes in its group (Linux /proc; empty elsewhere)."""
    found = set()
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc_dir.name)) != pgid:
                continue
            environ = (proc_dir / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(HUEY_STORAGE_VAR + b"="):
                found.add(Path(os.fsdecode(entry.split(b"=", 1)[1])))
    return {d for d in found if d.name.startswith("tmp") and str(d.parent) in ("/dev/shm", tempfile.gettempdir())}


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in process group ``pgid``, and of the children they have
    reaped (Linux /proc; 0 elsewhere)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after the name: state, parent, group, ...
            total += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group we started (the server and its workers), SIGKILL if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also any worker left behind by a parent that has exited
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def finished_sweep(uri: str, seeds: list[str]) -> list:
    """The sweep's child runs, one per seed, each FINISHED with its test metrics under the one FINISHED parent."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lenet-lab").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    children = [r for r in runs if r is not parent]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["seed"] for r in children) == seeds
    for run in children:
        assert (run.info.status, run.data.tags["mlflow.parentRunId"]) == ("FINISHED", parent.info.run_id)
        assert run.data.tags["sweep_id"] == parent.data.tags["sweep_id"] and "test_accuracy" in run.data.metrics
    return children


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen | None = None,
               log: Path | None = None, interval: float = 0.3):
    """What ``condition()`` returns once it is truthy, polled every ``interval`` seconds; fails the test (with
    ``log``'s tail) when ``process`` exits first or ``timeout`` seconds pass without it."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}:\n{log_tail(log) if log else ''}")
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s:\n{log_tail(log) if log else ''}")
        time.sleep(interval)


def answers(url: str, timeout: float = 5) -> bool:
    """Whether ``url`` answers a GET with 200."""
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def wait_for_health(proc: subprocess.Popen, url: str, log: Path, what: str, timeout: float = 300) -> None:
    """Return once the MLflow server ``proc`` (``what`` names it in failures) answers ``url``/health with 200;
    fail the test, with its log's tail, when it exits first or is not up within ``timeout`` seconds."""
    wait_until(lambda: answers(f"{url}/health"), timeout, f"{what} answering {url}/health", proc, log, 0.5)


# Wall seconds of each module in one ``make test`` (AMD EPYC Zen 4, 2 workers), rounded; a module not listed
# counts as 10. Only the order matters: refresh the figures when a module's cost changes by much.
MODULE_SECONDS = {
    "team_server": 90, "lifecycle": 90, "train": 85, "demo": 80, "notebooks": 75, "presets": 65, "resume_kill": 60,
    "distribute": 60, "logged": 60, "ray": 60, "layers": 55, "offline": 50, "slurm": 45, "config": 40, "tune": 40,
    "predict": 40, "sweep_resume": 40, "fair_comparison": 30, "console": 30, "ui": 25, "serving": 25,
    "architectures": 25, "cluster": 20, "data": 20, "gradcheck": 15, "compare": 15, "explain": 15, "layers_norm": 15,
}


def pytest_collection_modifyitems(config, items):
    """The longest modules first (stable otherwise): ``make test`` hands whole modules to two processes in this
    order (pytest-xdist, ``--dist loadfile --no-loadscope-reorder``; xdist's own order, by number of tests, left
    the one-test Ray and cluster modules, 2.5 minutes, to run alone at the end), so the short ones fill the end."""
    def seconds(item):
        return MODULE_SECONDS.get(item.module.__name__.rpartition(".")[2].removeprefix("test_"), 10)

    items.sort(key=lambda item: -seconds(item))


def pytest_collection_finish(session):
    """Every test module is imported now, and TensorFlow, Keras and MLflow with them: Python's garbage collector
    stops walking those long-lived objects (hundreds of thousands) in each full collection of the session, and
    in its last one (``gc.freeze``, as train.py does once it has started). Newer objects are collected as usual."""
    gc.freeze()


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """After each test, its garbage is collected and what it leaves alive (module fixtures, Keras's and
    TensorFlow's caches: hundreds of thousands of objects after a few in-process trainings) is frozen too.
    Otherwise every full collection walks it all again, and Keras (on deleting a layer's variable, in
    clear_session) and statsmodels (in Holm) run one per call: tests that train or compare after other such
    tests took 3-10 times their CPU time alone (docs/performance.md)."""
    yield
    gc.collect()
    gc.freeze()
