"""MLflow plumbing: where runs are stored and shown, the flattened config as params."""

import contextlib
import fcntl
import logging
import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from experiments import PROJECT_ROOT
from experiments.errors import UserError

SQLITE = "sqlite:///"
SERVER = ("http://", "https://")
DATABASE = "postgresql"  # a tracking store MLflow reaches directly: postgresql:// (psycopg 3, SQLAlchemy's default
# driver, from the cluster extra) or postgresql+<driver>://
CONNECT_TIMEOUT = 5  # seconds for a database to accept a connection before it counts as unreachable
UI = "http://127.0.0.1:5000"  # where `make ui` serves (mlflow ui's default address)

# A new store's tables being created is no news (MLflow says so at INFO for every new sqlite file); its
# warnings and errors still show.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def resolve_tracking_uri(uri: str | None) -> str:
    """``None`` means the project's own store, ``sqlite:///<project root>/mlflow.db``; a relative
    sqlite path is taken from the project root too. Other URIs (a tracking server, a PostgreSQL
    database) pass through."""
    if uri is None:
        return f"{SQLITE}{PROJECT_ROOT / 'mlflow.db'}"
    if uri.startswith(SQLITE):
        return f"{SQLITE}{PROJECT_ROOT / uri[len(SQLITE):]}"  # an absolute path stays as it is
    return uri


def shown_uri(uri: str) -> str:
    """The URI for the console: without its password, if it has one."""
    password = urlsplit(uri).password
    return uri.replace(f":{password}@", ":***@", 1) if password else uri


def run_page(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: on the tracking server itself, else in the UI `make ui` starts
    (``make ui STORE=<uri>`` for a store other than the project's)."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(SERVER):
        return f"{shown_uri(uri).rstrip('/')}/{page}"
    store = "" if uri == resolve_tracking_uri(None) else f" STORE={shown_uri(uri)}"
    return f"{UI}/{page} (make ui{store})"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a resolved ``sqlite:///`` URI, None for any other store."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def local_run_dir(tracking: DictConfig, kind: str, run_id: str) -> Path:
    """Where this machine keeps a run's local files of one kind (``checkpoints``, ``pending``):
    ``<kind>/<run id>`` in ``tracking.local_dir``, by default beside a sqlite store or under the
    project root for a tracking server."""
    if tracking.get("local_dir"):
        return Path(tracking.local_dir) / kind / run_id
    db = sqlite_path(resolve_tracking_uri(tracking.uri))
    return (db.parent if db else PROJECT_ROOT) / kind / run_id


@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise store/experiment creation: parallel jobs creating one sqlite DB at once race."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# A tracking server that does not answer must not hold a run for minutes (MLflow retries a failed
# request 7 times with growing pauses by default): fail fast, and let the outbox keep what it could
# not send (experiments/store/offline.py).
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


CONNECTION_ERRORS = ("Connection refused", "timed out", "Name or service not known", "No route to host",
                     "Connection reset", "Connection aborted")


def check_server(uri: str, timeout: float = 20) -> None:
    """A tracking server must answer, and accept this client's login, before any work starts: one
    authenticated request, no retries, ``timeout`` seconds at most. A server that is down or unreachable
    fails at once; the timeout is for one that accepts the connection: a busy server's first query
    (its database opened, its workers started) took over 5 s on a loaded 2-core machine. The login comes
    from the environment only: a URI with a password in it would be logged with the run's params."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    if urlsplit(uri).password is not None:
        raise UserError(f"tracking.uri {shown_uri(uri)}: a password in the URI would be logged with every run; "
                        f"give the login in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead.")
    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search", "GET",
                                max_retries=0, timeout=timeout, params={"max_results": 1})
    except Exception as e:  # connection refused, DNS, timeout: requests' and MLflow's wrappers of them
        reason = next((why for why in CONNECTION_ERRORS if why.lower() in str(e).lower()), type(e).__name__)
        raise UserError(f"tracking.uri {uri}: no MLflow server answers ({reason}).") from None
    if response.status_code in (401, 403):
        raise UserError(f"tracking.uri {uri}: {login_refused(response.status_code)}")
    if response.status_code != 200:
        raise UserError(f"tracking.uri {uri}: not an MLflow tracking server (HTTP {response.status_code} from "
                        "its REST API).")


class DatabaseAway(UserError):
    """The tracking store's database did not accept a connection (down, unreachable, or refusing the login):
    one line, exit 1."""

    exit_code = 1


def is_database(uri: str) -> bool:
    """Whether a resolved tracking URI is a database MLflow connects to itself (PostgreSQL)."""
    return urlsplit(uri).scheme.split("+")[0] == DATABASE


def connection_error(error: BaseException, uri: str) -> str:
    """Why a database connection failed, in one line: the driver's first, without psycopg's "connection failed: "
    prefix and without the URI's password."""
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0].removeprefix("connection failed: ")
    password = urlsplit(uri).password
    return reason.replace(password, "***") if password else reason


def check_database(uri: str, timeout: int = CONNECT_TIMEOUT) -> None:
    """A PostgreSQL tracking store must accept this client's connection before any work starts: one connection,
    ``timeout`` seconds at most (MLflow itself tries 10 times over ~100 s, each with a warning). The password comes
    from the environment only (PGPASSWORD, or ~/.pgpass): one in the URI would be logged with the run's params,
    as for a tracking server."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    shown = shown_uri(uri)
    if urlsplit(uri).password is not None:
        raise UserError(f"tracking.uri {shown}: a password in the URI would be logged with every run; give it in "
                        "PGPASSWORD or ~/.pgpass instead.")
    try:
        engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": timeout})
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as e:
        raise UserError(f"tracking.uri {shown}: PostgreSQL needs its driver ({e}): pip install -e '.[cluster]'.") \
            from None
    except ValueError as e:  # a port that is no number
        raise UserError(f"tracking.uri {shown}: not a database URI ({e}).") from None
    except SQLAlchemyError as e:
        raise DatabaseAway(f"tracking.uri {shown}: cannot connect to the database ({connection_error(e, uri)}).") \
            from None


def check_store(uri: str) -> str:
    """``uri`` resolved, once its tracking server or database has answered (every command, before any work);
    a sqlite store needs no check."""
    uri = resolve_tracking_uri(uri)
    if uri.startswith(SERVER):
        for key, value in FAIL_FAST.items():
            os.environ.setdefault(key, value)
        check_server(uri)
    elif is_database(uri):
        check_database(uri)
    return uri


def login_refused(status: int) -> str:
    """What a 401 or 403 from the server means for this client, and which environment variables to set."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 403:
        return (f"the server denies user {user!r} access (HTTP 403); ask its admin for a permission, or log in "
                "as another user with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.")
    if user is None:
        return ("the server asks for a login (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD.")
    return (f"the server refuses the login of user {user!r} (HTTP 401); check MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD.")


def setup_experiment(uri: str | None, name: str) -> str:
    """Point MLflow at the store and return the experiment id, creating store and experiment once.

    For a sqlite store, artifacts go to ``mlruns/<experiment>`` beside the database file, whatever
    the current directory (MLflow's own default is ``./mlruns`` relative to the cwd).
    """
    import mlflow  # seconds: here, not on import (`make server` checks its settings with this module, without it)

    uri = check_store(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri), permission_denied(uri, name):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        db = sqlite_path(uri)
        location = (db.parent / "mlruns" / name).as_uri() if db else None
        return mlflow.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def permission_denied(uri: str, experiment: str):
    """A server's 403 for the experiment (another user's, and its default permission is none) as one line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        if e.error_code != "PERMISSION_DENIED":
            raise
        raise UserError(f"tracking.experiment {experiment!r} on {shown_uri(uri)}: "
                        f"{login_refused(403)}") from None


def flatten_config(cfg: DictConfig) -> dict[str, str]:
    """Resolved config as MLflow params with dotted keys: ``{"model.name": "lenet", ...}``."""
    flat: dict[str, str] = {}

    def visit(node, prefix):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    visit(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
