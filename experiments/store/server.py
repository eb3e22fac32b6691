"""A tracking server for a team (``make server``): ``mlflow server`` with logins (MLflow's basic auth), runs in
a database (PostgreSQL for a team; the project's sqlite by default) and artifacts proxied by the server, so
clients on other machines log everything over HTTP and never touch its disk.

    MLFLOW_AUTH_ADMIN_PASSWORD=... python -m experiments.store.server --db postgresql://mlflow@dbhost/mlflow
    python -m experiments.store.server --admin-password-file ~/.mlflow-admin --host 0.0.0.0 -- --workers 2

Every setting is checked before anything starts (the database answers, the port is free, the admin user exists
or can be created); a bad one is one line naming it as ``make server`` spells it, and exit 2. Then this process
becomes ``mlflow server`` (exec): stop it with Ctrl-C or by signalling its process group.
"""

import argparse
import os
import secrets
import socket
import sys
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from experiments import PROJECT_ROOT
from experiments.errors import UserError
from experiments.store.tracking import CONNECT_TIMEOUT, connection_error, resolve_tracking_uri, shown_uri, sqlite_path

DATABASES = ("postgresql", "postgresql+psycopg2", "postgresql+psycopg", "sqlite")  # SQLAlchemy dialects of --db
JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"  # seven huey processes for jobs the lab never runs
LEGACY_ADMIN_PASSWORD = "password1234"  # what MLflow < 3.6 shipped in basic_auth.ini; refused here and by MLflow


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        """A malformed command line: one line, exit 2 (argparse's own adds the usage)."""
        self.exit(2, f"error: {message} (python -m experiments.store.server --help)\n")


def parser() -> argparse.ArgumentParser:
    """The options, each named after its ``make server`` variable."""
    p = OneLineParser(prog="python -m experiments.store.server", description=__doc__.split("\n\n")[0],
                      epilog="Options after -- go to `mlflow server` as they are (make server ARGS=...).")
    p.add_argument("--db", default=None, metavar="URI",
                   help="DB: the runs' database, postgresql://user@host:port/name (password from PGPASSWORD or "
                        "~/.pgpass, or in the URI) or sqlite:///file; default the project's sqlite:///mlflow.db")
    p.add_argument("--artifacts", default=str(PROJECT_ROOT / "mlruns"), metavar="FOLDER_OR_URI",
                   help="ARTIFACTS: where the server keeps artifacts, a folder or an object store URI (s3://...); "
                        "default %(default)s")
    p.add_argument("--host", default="127.0.0.1", help="HOST: the interface to listen on; default %(default)s")
    p.add_argument("--port", default="5000", help="PORT: default %(default)s")
    p.add_argument("--auth-dir", default=str(PROJECT_ROOT / "auth"), metavar="FOLDER",
                   help="AUTH_DIR: the generated basic_auth.ini, the logins' database and the server's secret key; "
                        "default %(default)s")
    p.add_argument("--auth-db", default=None, metavar="URI",
                   help="AUTH_DB: the logins' database; default sqlite:///AUTH_DIR/basic_auth.db")
    p.add_argument("--default-permission", default="READ", metavar="PERMISSION",
                   help="DEFAULT_PERMISSION: what a user may do with others' experiments without a grant: READ, "
                        "USE, EDIT, MANAGE or NO_PERMISSIONS; default %(default)s")
    p.add_argument("--auth-cache-seconds", default="60", metavar="SECONDS",
                   help="AUTH_CACHE_SECONDS: how long each server worker trusts a login it has checked (MLflow's "
                        "credential cache: a password's scrypt check costs ~0.1 CPU-s per request without it); a "
                        "changed password or deleted user may still log in on other workers that long; 0 checks "
                        "every request; default %(default)s")
    p.add_argument("--admin-password-file", default=None, metavar="FILE",
                   help="ADMIN_PASSWORD_FILE: the admin's password for the first start (else the environment's "
                        "MLFLOW_AUTH_ADMIN_PASSWORD); ignored once the admin user exists")
    return p


def check_db(uri: str, name: str = "DB") -> str:
    """A database URI of a supported kind that parses and, for PostgreSQL, accepts a connection now (a plain
    ``postgresql://`` through psycopg 3, SQLAlchemy's default driver, which the ``cluster`` extra installs)."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        url = sqlalchemy.engine.make_url(uri)
    except (ArgumentError, ValueError):
        url = None
    shown = url.render_as_string(hide_password=True) if url else uri
    if url is None or url.drivername not in DATABASES:
        raise UserError(f"{name} must be a postgresql://user@host:port/database or sqlite:///file URI, "
                        f"got {shown!r}.")
    if url.drivername == "sqlite":
        uri = resolve_tracking_uri(uri)  # relative to the project root, as everywhere in the project
        if not sqlite_path(uri).parent.is_dir():
            raise UserError(f"{name}={shown}: the folder {sqlite_path(uri).parent} does not exist.")
        return uri
    try:
        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT})
        with engine.connect():
            pass
    except ImportError as e:
        raise UserError(f"{name}={shown}: PostgreSQL needs its driver ({e}): pip install -e '.[cluster]'.") from None
    except SQLAlchemyError as e:
        raise UserError(f"{name}={shown}: cannot connect to the database ({connection_error(e, uri)}).") from None
    engine.dispose()
    return url.render_as_string(hide_password=False)


def check_artifacts(value: str) -> str:
    """An object store URI as it is, or a folder (made if missing) as an absolute path."""
    if urlsplit(value).scheme not in ("", "file"):
        return value
    folder = Path(urlsplit(value).path if value.startswith("file:") else value).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"ARTIFACTS={value}: cannot make the folder ({e.strerror}).") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"ARTIFACTS={value}: the folder is not writable.")
    return str(folder)


def check_address(host: str, port: str) -> int:
    """A port number that is free on the interface."""
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"PORT must be an integer in [1, 65535], got {port!r}.")
    try:
        with socket.create_server((host, int(port))):
            pass
    except socket.gaierror:
        raise UserError(f"HOST={host}: not an address of this machine.") from None
    except OSError as e:
        raise UserError(f"PORT={port}: cannot listen on {host}:{port} ({e.strerror}).") from None
    return int(port)


def auth_module():
    """``mlflow.server.auth``, MLflow's basic auth (the ``auth`` extra of mlflow)."""
    try:
        with warnings.catch_warnings():  # mlflow.server's imports warn about their own dependencies' deprecations
            warnings.simplefilter("ignore")
            from mlflow.server import auth
    except ImportError as e:
        raise UserError(f"--app-name basic-auth needs mlflow[auth] ({e}): pip install -e '.[cluster]'.") from None
    return auth


def check_permission(name: str) -> str:
    choices = [p for p in auth_module().permissions.ALL_PERMISSIONS if p != "DENY"]
    if name not in choices:
        raise UserError(f"DEFAULT_PERMISSION must be one of {', '.join(choices)}, got {name!r}.")
    return name


def check_auth_cache(value: str) -> int:
    if not value.isdigit():
        raise UserError(f"AUTH_CACHE_SECONDS must be an integer >= 0 (seconds), got {value!r}.")
    return int(value)


def admin_password(password_file: str | None) -> str | None:
    """The admin's first-start password: from the file if one is given, else the environment's."""
    if password_file is None:
        return os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") or None
    try:
        password = Path(password_file).expanduser().read_text().rstrip("\r\n")
    except OSError as e:
        raise UserError(f"ADMIN_PASSWORD_FILE={password_file}: cannot read it ({e.strerror}).") from None
    if not password:
        raise UserError(f"ADMIN_PASSWORD_FILE={password_file}: the file is empty.")
    return password


def secret_key(auth_dir: Path) -> str:
    """MLFLOW_FLASK_SERVER_SECRET_KEY (the logins' CSRF protection; one for all workers and restarts): from the
    environment, else made once into AUTH_DIR/secret_key, readable by its owner only."""
    if os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    path = auth_dir / "secret_key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def admin_username() -> str:
    """MLflow's admin user name: the environment's MLFLOW_AUTH_ADMIN_USERNAME, else admin."""
    return os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"


def write_auth_config(auth_dir: Path, auth_db: str, default_permission: str, cache_seconds: int) -> Path:
    """AUTH_DIR/basic_auth.ini for MLFLOW_AUTH_CONFIG_PATH: no admin password in it, ever."""
    path = auth_dir / "basic_auth.ini"
    path.write_text(
        "# Written by `make server` (python -m experiments.store.server) at every start: change its options,\n"
        "# not this file.\n"
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {auth_db}\n"
        f"admin_username = {admin_username()}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {cache_seconds}\n")
    path.chmod(0o600)  # AUTH_DB may carry the database's password
    return path


def bootstrap_admin(password: str | None, auth_db: str) -> None:
    """MLflow's own first start of the logins (``mlflow.server.auth.bootstrap_admin_user``), run here so that a
    missing or refused admin password is one line: the logins' tables, and the admin user with ``password`` if
    it does not exist yet (``auth_db``, not the config ``mlflow.server.auth`` read when it was imported)."""
    from mlflow.exceptions import MlflowException

    auth = auth_module()
    if password == LEGACY_ADMIN_PASSWORD:
        raise UserError("MLFLOW_AUTH_ADMIN_PASSWORD (or ADMIN_PASSWORD_FILE) is MLflow's old public default "
                        f"{LEGACY_ADMIN_PASSWORD!r}: choose another password.")
    auth.store.init_db(auth_db)
    username = admin_username()
    if password is None and not auth.store.has_user(username, use_primary=True):
        raise UserError(f"MLFLOW_AUTH_ADMIN_PASSWORD (or ADMIN_PASSWORD_FILE) must give the password of the admin "
                        f"user {username!r}, who does not exist yet in {shown_uri(auth_db)}, got nothing.")
    try:
        auth.create_admin_user(username, password)
    except MlflowException as e:
        reason = getattr(e.__cause__, "message", e.message)  # MLflow's policy, without its advice on its ini
        raise UserError(f"MLFLOW_AUTH_ADMIN_PASSWORD (or ADMIN_PASSWORD_FILE) for the admin user {username!r} is "
                        f"refused: {reason}") from None


def prepare(args: argparse.Namespace, mlflow_args: list[str]) -> tuple[list[str], dict[str, str], str]:
    """Check every setting, set up the logins; the ``mlflow server`` command line, its environment and what to
    tell the user."""
    password = admin_password(args.admin_password_file)
    db = check_db(args.db or resolve_tracking_uri(None))
    artifacts = check_artifacts(args.artifacts)
    port = check_address(args.host, args.port)
    permission = check_permission(args.default_permission)
    cache_seconds = check_auth_cache(args.auth_cache_seconds)
    auth_dir = Path(args.auth_dir).expanduser().resolve()
    try:
        auth_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"AUTH_DIR={args.auth_dir}: cannot make the folder ({e.strerror}).") from None
    auth_db = check_db(args.auth_db, "AUTH_DB") if args.auth_db else f"sqlite:///{auth_dir / 'basic_auth.db'}"
    env = {JOB_EXECUTION: "false", **os.environ,  # MLflow's job runner (GenAI jobs) off, unless the user turns it on
           "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(auth_dir, auth_db, permission, cache_seconds)),
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key(auth_dir),
           "MLFLOW_BACKEND_STORE_URI": db}  # --backend-store-uri, not on a command line any local user can read
    bootstrap_admin(password, auth_db)
    env.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)  # the admin exists now: the server has no use for the password
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
               "--serve-artifacts", "--artifacts-destination", artifacts,
               "--host", args.host, "--port", str(port), *mlflow_args]
    return command, env, announcement(args.host, port, db, artifacts, auth_dir)


def announcement(host: str, port: int, db: str, artifacts: str, auth_dir: Path) -> str:
    """Where the server is, what it keeps where, how clients log to it; a warning when it listens beyond this
    machine (basic auth sends the password with every request: unencrypted over plain http)."""
    exposed = host not in ("127.0.0.1", "localhost", "::1")
    url = f"http://{socket.getfqdn() if host in ('0.0.0.0', '::') else host}:{port}"
    lines = [f"MLflow tracking server for a team: {url} (runs: {shown_uri(db)}; artifacts: {artifacts}; "
             f"logins: {auth_dir})",
             f"clients: MLFLOW_TRACKING_USERNAME=<user> MLFLOW_TRACKING_PASSWORD=<password> "
             f"python train.py tracking.uri={url}"]
    if exposed:
        lines.append(f"warning: listening on {host}: passwords cross the network in clear text unless a TLS proxy "
                     "(https) stands in front of this server.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, mlflow_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser().parse_args(ours)
    try:
        command, env, announced = prepare(args, mlflow_args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(announced, flush=True)
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
