"""The team tracking server (`make server`, experiments/store/server.py): `mlflow server` with basic-auth logins
in front of a real PostgreSQL (a throwaway cluster started here), artifacts proxied by the server; a 2-job
submitit_local sweep logs to it over HTTP with a login from the environment, and everything it logged reads back
through the server, for its owner only. And the same PostgreSQL as train.py's and compare.py's tracking.uri
itself (no server): a run ends FINISHED and reads back; a database that does not let train.py in stops it in one
line before training."""

import os
import pwd
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import optuna
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments import PROJECT_ROOT
from experiments.store.tracking import shown_uri
from tests.conftest import (
    free_port,
    group_cpu_seconds,
    huey_storage_dirs,
    log_tail,
    run_train,
    stop_group,
    wait_for_health,
)

pytest.importorskip("psycopg", reason="psycopg is missing: pip install -e '.[cluster]' (make test installs it)")
pytest.importorskip("flask_wtf", reason="mlflow[auth] is missing: pip install -e '.[cluster]' (make test installs it)")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="hydra-submitit-launcher is missing: pip install -e '.[cluster]' (make test installs it)")

ADMIN_PASSWORD = "admin-pw-for-the-test"
USERS = {"alice": "alice-pw-trains-here", "bob": "bob-pw-sees-nothing"}  # alice logs the sweep; bob has no grant
DB_PASSWORD = "db-pw-of-mlflow-role"
SEEDS = ["0", "1"]
STARTUP_TIMEOUT = 300  # s: mlflow server and its workers on a loaded 2-core machine took ~50 s
SERVER = [sys.executable, "-m", "experiments.store.server"]


def env_without_login(**extra: str) -> dict[str, str]:
    """This environment without any MLflow login or admin password, plus ``extra``."""
    drop = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_TRACKING_URI")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def login(user: str, password: str | None = None) -> dict[str, str]:
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password or USERS[user]}


# --- bad input: one line, exit 2, nothing started (no PostgreSQL needed) -------------------------------------

@pytest.mark.scale
@pytest.mark.parametrize("options, admin_password, expected", [
    ([], None, "error: MLFLOW_AUTH_ADMIN_PASSWORD (or ADMIN_PASSWORD_FILE) must give the password of the admin "
               "user 'admin', who does not exist yet in sqlite:///"),
    ([], "password1234", "error: MLFLOW_AUTH_ADMIN_PASSWORD (or ADMIN_PASSWORD_FILE) is MLflow's old public "
                         "default 'password1234'"),
    (["--db", "mysql://mlflow:secret@dbhost/mlflow"], ADMIN_PASSWORD,
     "error: DB must be a postgresql://user@host:port/database or sqlite:///file URI, got "
     "'mysql://mlflow:***@dbhost/mlflow'."),
    (["--db", "not a uri"], ADMIN_PASSWORD,
     "error: DB must be a postgresql://user@host:port/database or sqlite:///file URI, got 'not a uri'."),
    (["--db", "postgresql://mlflow:secret@127.0.0.1:{port}/mlflow"], ADMIN_PASSWORD,
     "error: DB=postgresql://mlflow:***@127.0.0.1:{port}/mlflow: cannot connect to the database (connection to "
     "server at \"127.0.0.1\", port {port} failed: Connection refused"),
    (["--default-permission", "read"], ADMIN_PASSWORD,
     "error: DEFAULT_PERMISSION must be one of READ, USE, EDIT, MANAGE, NO_PERMISSIONS, got 'read'."),
    (["--port", "http"], ADMIN_PASSWORD, "error: PORT must be an integer in [1, 65535], got 'http'."),
    (["--auth-cache-seconds", "-1"], ADMIN_PASSWORD,
     "error: AUTH_CACHE_SECONDS must be an integer >= 0 (seconds), got '-1'."),
], ids=["no-admin-password", "mlflow-old-default", "not-postgresql", "malformed", "unreachable", "permission",
        "port", "auth-cache"])
def test_bad_server_settings_stop_in_one_line_before_anything_starts(tmp_path, options, admin_password, expected):
    port = str(free_port())  # nothing listens there: the unreachable database
    options = [o.replace("{port}", port) for o in options]
    expected = expected.replace("{port}", port)
    defaults = {"--db": f"sqlite:///{tmp_path / 'mlflow.db'}", "--port": str(free_port()),
                "--auth-dir": str(tmp_path / "auth"), "--artifacts": str(tmp_path / "artifacts")}
    options += [item for option, value in defaults.items() if option not in options for item in (option, value)]
    env = env_without_login(**({"MLFLOW_AUTH_ADMIN_PASSWORD": admin_password} if admin_password else {}))
    started = time.monotonic()
    result = subprocess.run([*SERVER, *options], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""  # the announcement comes only once everything is checked, just before the exec
    assert time.monotonic() - started < 60  # imports (MLflow's server) and a 5 s connect timeout at most
    assert not (tmp_path / "mlflow.db").exists()  # the runs' database is untouched


@pytest.mark.scale
def test_make_server_passes_its_variables_to_the_module(tmp_path):
    """The Makefile's variables reach experiments/store/server.py (-o: the venv is not reinstalled here)."""
    result = subprocess.run(["make", "-s", "-C", str(PROJECT_ROOT), "-o", str(PROJECT_ROOT / ".venv" / ".installed"),
                             "server", "DB=mysql://x@y/z", "PORT=5999"],
                            env=env_without_login(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[0] == ("error: DB must be a postgresql://user@host:port/database or "
                                             "sqlite:///file URI, got 'mysql://x@y/z'.")


# --- a throwaway PostgreSQL cluster ------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """Debian's PostgreSQL binaries (not on PATH there): the newest /usr/lib/postgresql/<version>/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@dataclass
class Postgres:
    uri: str  # the mlflow role's database, password included
    admin: Callable[[str], None]  # runs one SQL statement as the superuser (what the role may not do itself)


@pytest.fixture(scope="module")
def postgres():
    """initdb + pg_ctl on a temporary folder and a free localhost port (as user postgres when run as root: they
    refuse root), a database and a role with a password for MLflow; pg_ctl stop at the end."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/pg_ctl, no initdb on PATH): "
                    "apt-get install postgresql")
    as_owner: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="team-server-pg-"))  # pytest's tmp folders are root's alone (0700)
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no user postgres for initdb/pg_ctl, which refuse root")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = root / "data", root / "postgres.log"

    def run(*cmd: str) -> None:
        subprocess.run([*as_owner, *cmd], check=True, capture_output=True, text=True, timeout=120)

    try:
        (root / "pwfile").write_text("unused-superuser-password\n")
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--no-sync", "--auth-local=trust",
            "--auth-host=scram-sha-256", f"--pwfile={root / 'pwfile'}")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", "start",
            "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off")
        psql = [str(bin_dir / "psql"), "-h", str(root), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        run(*psql, "-c", f"CREATE ROLE mlflow LOGIN PASSWORD '{DB_PASSWORD}'",
            "-c", "CREATE DATABASE mlflow OWNER mlflow")
    except subprocess.CalledProcessError as e:
        subprocess.run([*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"{' '.join(e.cmd)} failed ({e.returncode}): {e.stderr}\n{log_tail(log)}")
    try:
        yield Postgres(f"postgresql://mlflow:{DB_PASSWORD}@127.0.0.1:{port}/mlflow", lambda sql: run(*psql, "-c", sql))
    finally:
        subprocess.run([*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


# --- PostgreSQL as the tracking store itself: train.py, compare.py (no server) ------------------------------------

def without_password(uri: str) -> str:
    """The URI as train.py takes it: the password goes in PGPASSWORD (or ~/.pgpass), never in the URI."""
    return uri.replace(f":{DB_PASSWORD}@", "@", 1)


@pytest.mark.slow
@pytest.mark.scale
def test_train_and_compare_use_a_postgresql_database_as_their_store(postgres, tmp_path, monkeypatch):
    """Was: ModuleNotFoundError: No module named 'psycopg' (SQLAlchemy 2.1's driver for a plain postgresql://)."""
    uri = without_password(postgres.uri)
    env = {**env_without_login(), "PGPASSWORD": DB_PASSWORD}
    store = ["tracking.experiment=straight-to-postgres", f"tracking.uri={uri}"]  # not the server's lenet-lab
    trained = run_train(["debug=tiny", *store, f"tracking.local_dir={tmp_path / 'local'}"], tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert trained.stdout.splitlines()[0].endswith(f"in experiment straight-to-postgres, {uri}")
    monkeypatch.setenv("PGPASSWORD", DB_PASSWORD)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("straight-to-postgres").experiment_id])
    assert run.info.status == "FINISHED" and f"MLflow run id: {run.info.run_id}" in trained.stdout
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]
    assert (tmp_path / "local" / "checkpoints" / run.info.run_id / "checkpoint.npz").is_file()

    compared = subprocess.run([sys.executable, str(PROJECT_ROOT / "compare.py"), *store,
                               f"output_dir={tmp_path / 'report'}", f"hydra.run.dir={tmp_path / 'hydra-compare'}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert compared.returncode == 0, compared.stderr[-3000:]
    row = next(line for line in compared.stdout.splitlines() if line.startswith("| lenet "))
    assert [cell.strip() for cell in row.strip("|").split("|")][2] == "1"  # runs: the one trained
    assert DB_PASSWORD not in trained.stdout + trained.stderr + compared.stdout + compared.stderr


@pytest.mark.slow
@pytest.mark.scale
def test_two_tune_py_processes_share_one_study_in_the_tracking_databases_server(postgres, tmp_path):
    """tune.py over a PostgreSQL tracking store keeps its study in <database>_optuna on the same server. A login
    that may not create it is told how in one line; once it exists, two processes take the study's trials under
    its advisory lock and end with exactly the budget together."""
    uri = without_password(postgres.uri)
    env = {**env_without_login(), "PGPASSWORD": DB_PASSWORD}
    args = [sys.executable, str(PROJECT_ROOT / "tune.py"), "debug=tiny", "tune.epochs=1", "tune.trials=3",
            "tune.pruner=none", f"tracking.uri={uri}", f"tracking.local_dir={tmp_path / 'local'}"]

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([*args, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    refused = start("refused")
    _, error = refused.communicate(timeout=300)
    assert refused.returncode == 2, error[-3000:]
    assert error.strip().splitlines()[-1].endswith("create it once with: createdb mlflow_optuna"), error[-3000:]
    postgres.admin("CREATE DATABASE mlflow_optuna OWNER mlflow")
    processes = [start(f"tune{i}") for i in range(2)]
    for process in processes:
        _, error = process.communicate(timeout=600)
        assert process.returncode == 0, error[-3000:]
    storage = postgres.uri.removesuffix("/mlflow") + "/mlflow_optuna"
    trials = optuna.load_study(study_name="default-mnist-lenet", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert {t.user_attrs["pid"] for t in trials} == {str(p.pid) for p in processes}  # both took trials


@pytest.mark.scale
@pytest.mark.parametrize("case", ["closed-port", "wrong-password", "password-in-uri", "closed-port-sweep"])
def test_a_database_that_does_not_let_train_py_in_stops_it_in_one_line_before_training(postgres, tmp_path,
                                                                                     monkeypatch, case):
    """Was: MLflow's 10 tries over ~100 s, each with a warning and a traceback, then a traceback (a sweep: its jobs
    ran without their sweep, each failing so)."""
    uri, password = without_password(postgres.uri), DB_PASSWORD
    if case.startswith("closed-port"):
        uri = uri.replace(f":{urlsplit(uri).port}/", f":{free_port()}/")  # nothing listens there
    elif case == "wrong-password":
        password = "not-the-db-password"
    else:
        uri = postgres.uri
    port = urlsplit(uri).port
    env = {**env_without_login(), "PGPASSWORD": password}
    started = time.monotonic()
    sweep = ["-m", "seed=0,1"] if case.endswith("sweep") else []
    result = run_train([*sweep, f"tracking.uri={uri}", "tracking.experiment=never-created"], tmp_path, env=env,
                       timeout=120)
    seconds = time.monotonic() - started
    expected = {
        "closed-port": (1, f'cannot connect to the database (connection to server at "127.0.0.1", port {port} '
                           "failed: Connection refused)."),
        "wrong-password": (1, f'cannot connect to the database (connection to server at "127.0.0.1", port {port} '
                              'failed: FATAL:  password authentication failed for user "mlflow").'),
        "password-in-uri": (2, "a password in the URI would be logged with every run; give it in PGPASSWORD or "
                               "~/.pgpass instead."),
    }[case.removesuffix("-sweep")]
    assert result.returncode == expected[0], result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"error: tracking.uri {shown_uri(uri)}: {expected[1]}"]
    assert result.stdout == "" and DB_PASSWORD not in result.stderr and password not in result.stderr
    assert not (tmp_path / "multirun").exists()  # no job of a sweep ran
    assert seconds < 60, seconds  # Hydra's and MLflow's imports: no retries, and TensorFlow not even loaded
    monkeypatch.setenv("PGPASSWORD", DB_PASSWORD)
    assert MlflowClient(without_password(postgres.uri)).get_experiment_by_name("never-created") is None


# --- the server, its users, and a sweep logged through it ---------------------------------------------------------

@dataclass
class TeamServer:
    url: str
    artifacts: Path  # the server's --artifacts-destination
    log: Path
    pgid: int  # the server's process group


@pytest.fixture(scope="module")
def team_server(postgres, tmp_path_factory):
    """experiments/store/server.py as `make server` runs it, over the PostgreSQL database, with nobody allowed into
    another's experiments (NO_PERMISSIONS); the admin creates alice and bob through the auth API."""
    root = tmp_path_factory.mktemp("team_server")
    port, log = free_port(), root / "server.log"
    command = [*SERVER, "--db", postgres.uri, "--artifacts", str(root / "artifacts"), "--port", str(port),
               "--auth-dir", str(root / "auth"), "--default-permission", "NO_PERMISSIONS", "--", "--workers", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=root, env=env_without_login(MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url, log, "experiments.store.server", STARTUP_TIMEOUT)
        assert not huey_storage_dirs(proc.pid), "MLflow's job runner started: it should be off"
        for user, password in USERS.items():
            response = requests.post(f"{url}/api/2.0/mlflow/users/create", auth=("admin", ADMIN_PASSWORD),
                                     json={"username": user, "password": password}, timeout=30)
            assert response.status_code == 200, response.text
        yield TeamServer(url, root / "artifacts", log, proc.pid)
    finally:
        stop_group(proc)


@dataclass
class Sweep:
    client_dir: Path  # the submitting machine's working folder: Hydra's outputs, submitit's logs
    local_dir: Path  # tracking.local_dir: the only place the jobs may keep files of their own
    seconds: float
    cpu_seconds: float


@pytest.fixture(scope="module")
def sweep(team_server, tmp_path_factory):
    """alice's 2-job submitit_local sweep, every job its own process logging to the server over HTTP."""
    client_dir = tmp_path_factory.mktemp("alice_machine")
    local_dir = client_dir / "local"
    started, cpu = time.monotonic(), children_cpu_seconds()
    result = run_train(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                        f"seed={','.join(SEEDS)}", "debug=tiny", "trainer.plots=true",
                        f"tracking.uri={team_server.url}", f"tracking.local_dir={local_dir}"],
                       client_dir, env={**env_without_login(), **login("alice")})
    assert result.returncode == 0, result.stderr[-3000:] + log_tail(team_server.log, 2000)
    return Sweep(client_dir, local_dir, time.monotonic() - started, children_cpu_seconds() - cpu)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture
def as_user(monkeypatch, team_server):
    """An MlflowClient of the server logged in as the given user (the environment, as every client does)."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def client(user: str) -> MlflowClient:
        for key, value in login(user).items():
            monkeypatch.setenv(key, value)
        return MlflowClient(team_server.url)
    return client


def sweep_runs(client: MlflowClient) -> tuple[str, object, list]:
    experiment = client.get_experiment_by_name("lenet-lab")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    return experiment, parent, [r for r in runs if r is not parent]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.scale
def test_a_sweep_logs_everything_through_the_server_and_reads_back(team_server, sweep, as_user, tmp_path):
    client = as_user("alice")
    experiment, parent, children = sweep_runs(client)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied: the server writes artifacts
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.params["seed"] for r in children) == SEEDS
    logged: dict[str, dict[str, bytes]] = {}  # every file logged, by run or model, as read through the server
    for run in [parent, *children]:
        run_id = run.info.run_id
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        for key, value in run.data.metrics.items():  # every metric, through the server
            history = client.get_metric_history(run_id, key)
            assert history and history[-1].value == value, key
        logged[run_id] = files_under(Path(client.download_artifacts(run_id, "", str(tmp_path / run_id))))
        assert logged[run_id] == files_under(team_server.artifacts / experiment.experiment_id / run_id / "artifacts")
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"loss", "val_accuracy", "test_accuracy"} <= set(run.data.metrics)
        assert {"config.yaml", "overrides.txt", "model_summary.txt"} <= set(logged[run.info.run_id])
        assert any(name.startswith("plots/") for name in logged[run.info.run_id])

    models = client.search_logged_models([experiment.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted(r.info.run_id for r in children)
    for model in models:
        assert model.artifact_location.startswith("mlflow-artifacts:")
        logged[model.model_id] = files_under(Path(mlflow.artifacts.download_artifacts(
            artifact_uri=model.artifact_location, dst_path=str(tmp_path / model.model_id),
            tracking_uri=team_server.url)))
        assert "MLmodel" in logged[model.model_id]
        kept = team_server.artifacts / experiment.experiment_id / "models" / model.model_id / "artifacts"
        assert logged[model.model_id] == files_under(kept)

    # the jobs kept nothing on the submitting machine but Hydra's and submitit's outputs and tracking.local_dir
    assert {p.name for p in sweep.client_dir.iterdir()} <= {"multirun", "hydra", "local"}
    artifact_names = {Path(name).name for files in logged.values() for name in files} - {"config.yaml"}  # Hydra's
    assert [p for p in (sweep.client_dir / "multirun").rglob("*") if p.name in artifact_names] == []

    # the login travels in the environment only: never in a param, a tag or a logged file
    secret = USERS["alice"]
    for run in [parent, *children]:
        assert not [v for v in {**run.data.params, **run.data.tags}.values() if secret in v]
    assert not [(key, name) for key, files in logged.items() for name, data in files.items() if secret.encode() in data]
    assert not [p for p in sweep.client_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    print(f"sweep of {len(SEEDS)} jobs through the server: {sweep.seconds:.0f} s, {sweep.cpu_seconds:.0f} CPU-s")


@pytest.mark.slow
@pytest.mark.scale
def test_requests_without_a_login_get_401(team_server, sweep):
    api = f"{team_server.url}/api/2.0/mlflow"
    assert requests.get(f"{api}/experiments/search", params={"max_results": 1}, timeout=30).status_code == 401
    wrong = requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=("alice", "not-her-password"),
                         timeout=30)
    assert wrong.status_code == 401
    legacy = requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=("admin", "password1234"),
                          timeout=30)
    assert legacy.status_code == 401  # MLflow's old default admin password is not the admin's
    admin = requests.get(f"{api}/experiments/search", params={"max_results": 1}, auth=("admin", ADMIN_PASSWORD),
                         timeout=30)
    assert admin.status_code == 200


@pytest.mark.slow
@pytest.mark.scale
def test_a_checked_login_is_trusted_for_a_minute_not_hashed_again_on_every_request(team_server):
    """MLflow checks a password against its scrypt hash (~0.13 CPU-s). A wrong password is checked on every request;
    with the credential cache on (make server's default, 60 s), a right one once per server worker: its requests
    cost the server a fraction of the wrong one's."""
    assert "auth_cache_ttl_seconds = 60\n" in (team_server.log.parent / "auth" / "basic_auth.ini").read_text()
    url = f"{team_server.url}/api/2.0/mlflow/experiments/search"

    def server_cpu_per_request(password: str, requests_made: int, status: int) -> float:
        before = group_cpu_seconds(team_server.pgid)
        for _ in range(requests_made):
            response = requests.get(url, params={"max_results": 1}, auth=("alice", password), timeout=30)
            assert response.status_code == status
        return (group_cpu_seconds(team_server.pgid) - before) / requests_made

    checked = server_cpu_per_request("not-her-password", 10, 401)
    trusted = server_cpu_per_request(USERS["alice"], 40, 200)
    print(f"server CPU-ms per request: {1000 * checked:.0f} with its password checked, {1000 * trusted:.0f} trusted")
    assert trusted < checked / 2


@pytest.mark.slow
@pytest.mark.scale
def test_a_user_without_a_grant_gets_403_on_the_sweep(team_server, sweep, as_user):
    _, parent, children = sweep_runs(as_user("alice"))
    api = f"{team_server.url}/api/2.0/mlflow"
    bob = ("bob", USERS["bob"])
    for run in [parent, *children]:
        response = requests.get(f"{api}/runs/get", params={"run_id": run.info.run_id}, auth=bob, timeout=30)
        assert response.status_code == 403, response.text
    assert requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "lenet-lab"}, auth=bob,
                        timeout=30).status_code == 403
    searched = requests.post(f"{api}/runs/search", json={"experiment_ids": [parent.info.experiment_id]}, auth=bob,
                             timeout=30)
    assert searched.status_code == 200 and searched.json().get("runs", []) == []  # searches leave his runs out
    with pytest.raises(MlflowException) as denied:
        as_user("bob").get_run(children[0].info.run_id)
    assert denied.value.error_code == "PERMISSION_DENIED"


@pytest.mark.slow
@pytest.mark.scale
def test_compare_reads_the_sweep_through_the_server(team_server, sweep, as_user, tmp_path):
    _, parent, children = sweep_runs(as_user("alice"))
    sweep_id = parent.data.tags["sweep_id"]
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "compare.py"), f"tracking.uri={team_server.url}",
                             f"sweep_id={sweep_id}", f"output_dir={tmp_path / 'report'}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"],
                            cwd=tmp_path, env={**env_without_login(), **login("alice")}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Logged to sweep parent run {parent.info.run_id}" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| lenet "))
    assert [cell.strip() for cell in row.strip("|").split("|")][2] == str(len(children))  # runs: the seeds
    logged = as_user("alice").list_artifacts(parent.info.run_id, "comparison")
    assert logged, "the report is logged to the sweep's parent run through the server"


@pytest.mark.slow
@pytest.mark.scale
def test_a_wrong_password_fails_before_training_in_one_line(team_server, sweep, as_user, tmp_path):
    client = as_user("alice")
    experiment, _, _ = sweep_runs(client)
    runs_before = len(client.search_runs([experiment.experiment_id]))
    started, cpu = time.monotonic(), children_cpu_seconds()
    result = run_train([f"tracking.uri={team_server.url}", "trainer.epochs=1"], tmp_path,
                       env={**env_without_login(), **login("alice", "not-her-password")})
    seconds, cpu_seconds = time.monotonic() - started, children_cpu_seconds() - cpu
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: tracking.uri {team_server.url}: the server refuses the login of user 'alice' (HTTP 401); check "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.")
    assert "Traceback" not in result.stderr
    assert len(client.search_runs([experiment.experiment_id])) == runs_before  # stopped before any run
    # no retries (they last minutes): the process's own start (Hydra, TensorFlow's import) is nearly all of it
    assert seconds < 60 and cpu_seconds < 20, (seconds, cpu_seconds)
    print(f"wrong password: exit 2 after {seconds:.1f} s, {cpu_seconds:.1f} CPU-s")


@pytest.mark.slow
@pytest.mark.scale
def test_no_password_on_the_servers_command_lines_or_in_its_output(team_server, sweep):
    """ps shows every local user a command line: the database's password goes in the environment, the admin's
    is not kept at all once the admin user exists."""
    command_lines = []
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if os.getpgid(int(proc_dir.name)) == team_server.pgid:
                command_lines.append((proc_dir / "cmdline").read_bytes())
        except OSError:
            continue
    assert command_lines and not [c for c in command_lines if DB_PASSWORD.encode() in c]
    output = team_server.log.read_text()
    assert "postgresql://mlflow:***@127.0.0.1" in output  # the announcement, password hidden
    assert DB_PASSWORD not in output and ADMIN_PASSWORD not in output
