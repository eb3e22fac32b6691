"""`make ui` really serves our runs.

A real MLflow server, started with the command line `make ui` runs (as `make -n` prints it, only the
project directory swapped for a temporary one), from an unrelated working directory, over a temporary
sqlite store in which runs were logged the way ``experiments/run/training.py`` logs them. Checked through the
REST API, the artifact endpoint the UI downloads from, the index page, and, when Chromium is installed,
the rendered React pages.
"""

import html
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import requests
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from experiments import PROJECT_ROOT
from experiments.run.lifecycle import tracked_run
from experiments.store.tracking import flatten_config, resolve_tracking_uri, setup_experiment
from tests.conftest import compose_train, free_port, huey_storage_dirs, log_tail, stop_group, wait_for_health

MAKEFILE = PROJECT_ROOT / "Makefile"
EXPERIMENT = "ui-test"
MODELS = ("lenet", "simple_conv")
EPOCHS = 3
STARTUP_TIMEOUT = 120  # s; ~10 s on an idle 2-core machine, 30-45 s seen while other test suites ran
REQUEST_TIMEOUT = 30
CHROMIUM_TIMEOUT = 120
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,900", "--virtual-time-budget=20000",
]


# --- the Makefile's `ui` command ------------------------------------------------------------------------


def make_ui_command(root: Path | None = None, args: str = "", cwd: Path | None = None) -> list[str]:
    """The command line `make ui` runs (as printed by ``make -n``), for the project at ``root``
    (default: the Makefile's own folder), with this project's virtualenv."""
    venv = PROJECT_ROOT / ".venv"
    overrides = [f"VENV={venv}", f"ARGS={args}"] + ([f"ROOT={root}"] if root else [])
    out = subprocess.run(
        ["make", "-s", "-n", "-f", str(MAKEFILE), "-o", f"{venv}/.installed", "ui", *overrides],
        cwd=cwd or PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if "--backend-store-uri" in line]
    assert len(lines) == 1, out.stdout
    return shlex.split(lines[0])


# What the Makefile exports to `mlflow ui` (make -n prints the command, not its environment): MLflow's usage
# reports and its job runner off.
MAKE_EXPORTS = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def test_make_ui_runs_mlflow_with_the_makefiles_exports_and_the_users_own_win(tmp_path):
    """`make ui` for real, with a stand-in `mlflow` in a stand-in virtualenv that prints its environment."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "mlflow"
    fake.write_text("#!/bin/sh\n" + "".join(f'echo "{name}=${name}"\n' for name in MAKE_EXPORTS))
    fake.chmod(0o755)
    (venv / ".installed").touch()
    env = {k: v for k, v in os.environ.items() if k not in MAKE_EXPORTS}

    def make_ui(**extra) -> set[str]:
        out = subprocess.run(["make", "-s", "-f", str(MAKEFILE), f"VENV={venv}", "ui"], cwd=tmp_path,
                             env=env | extra, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return set(out.stdout.split())

    assert make_ui() == {f"{name}={value}" for name, value in MAKE_EXPORTS.items()}
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true" in make_ui(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="true")


def option(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {shlex.join(command)}"
    return command[command.index(name) + 1]


def test_make_ui_serves_the_project_store(tmp_path):
    """`make ui` shows the store train.py writes, with absolute paths only, from any directory."""
    command = make_ui_command(cwd=tmp_path)
    assert command[0] == str(PROJECT_ROOT / ".venv/bin/mlflow") and command[1] == "ui"
    backend = option(command, "--backend-store-uri")
    assert backend == resolve_tracking_uri(None) == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    # Beside the database, where setup_experiment puts each experiment's artifacts (mlruns/<name>).
    assert option(command, "--default-artifact-root") == str(PROJECT_ROOT / "mlruns")
    assert make_ui_command() == command  # the same from the project root


# --- a store with runs, and a server over it ------------------------------------------------------------


@dataclass
class LoggedRun:
    run_id: str
    name: str
    params: dict[str, str]
    history: dict[str, list[float]]  # per-epoch metrics, steps 1..EPOCHS
    metrics: dict[str, float]  # latest value of every metric
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact path -> file on disk


@dataclass
class Server:
    url: str
    experiment_id: str
    runs: list[LoggedRun]
    project: Path
    cwd: Path


def curve_figure(history: dict[str, list[float]]) -> Figure:
    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    for key, values in history.items():
        ax.plot(range(1, len(values) + 1), values, label=key)
    ax.legend()
    return fig


def log_runs(project: Path) -> tuple[str, list[LoggedRun]]:
    """Runs as experiments/run/training.py logs them: tracked_run, flattened config, per-epoch metrics with
    steps from 1, text and PNG artifacts."""
    previous_uri = mlflow.get_tracking_uri()
    uri = f"sqlite:///{project / 'mlflow.db'}"
    try:
        experiment_id = setup_experiment(uri, EXPERIMENT)
        runs = []
        for i, model in enumerate(MODELS):
            cfg = compose_train([f"model={model}", f"trainer.epochs={EPOCHS}"])
            name = f"{cfg.model.name}-{cfg.data.name}-seed{cfg.seed}"
            tags = {"model": cfg.model.name, "dataset": cfg.data.name}
            params = flatten_config(cfg)
            history = {
                "loss": [1.0 / (epoch + i + 1) for epoch in range(EPOCHS)],
                "val_accuracy": [0.5 + 0.1 * epoch + 0.01 * i for epoch in range(EPOCHS)],
            }
            with tracked_run(experiment_id, name, tags) as run:
                mlflow.log_params(params)
                for epoch in range(EPOCHS):
                    mlflow.log_metrics({k: v[epoch] for k, v in history.items()}, step=epoch + 1)
                mlflow.log_metric("test_accuracy", 0.9 + 0.01 * i)
                mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
                mlflow.log_figure(curve_figure(history), "plots/training_curves.png")
            run_id = run.info.run_id
            # The project's artifact scheme: <db dir>/mlruns/<experiment>/<run id>/artifacts
            artifact_dir = project / "mlruns" / EXPERIMENT / run_id / "artifacts"
            runs.append(LoggedRun(
                run_id, name, params, history,
                metrics={**{k: v[-1] for k, v in history.items()}, "test_accuracy": 0.9 + 0.01 * i},
                artifacts={p: artifact_dir / p for p in ("config.yaml", "plots/training_curves.png")},
            ))
        return experiment_id, runs
    finally:
        mlflow.set_tracking_uri(previous_uri)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    project = tmp_path_factory.mktemp("ui_project")
    cwd = tmp_path_factory.mktemp("ui_elsewhere")  # not the project: absolute paths must carry it
    log = tmp_path_factory.mktemp("ui_log") / "server.log"
    experiment_id, runs = log_runs(project)

    port = free_port()
    command = make_ui_command(project, f"--host 127.0.0.1 --port {port}")
    if not Path(command[0]).exists():
        pytest.skip(f"{command[0]} not found: run `make ui` once to create the virtualenv")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | MAKE_EXPORTS
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(proc, url, log, f"`{shlex.join(command)}`", STARTUP_TIMEOUT)
        assert not huey_storage_dirs(proc.pid), "MLflow's job runner started: make ui turns it off"
        yield Server(url, experiment_id, runs, project, cwd)
    finally:
        stop_group(proc)


# --- the REST API and the pages the UI is built from ------------------------------------------------------


def get_json(url: str, **params) -> dict:
    response = requests.get(url, params=params, timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200, f"{response.url}: {response.status_code} {response.text[:500]}"
    return response.json()


@pytest.mark.slow
def test_server_serves_runs_metrics_and_artifacts(ui_server):
    api = f"{ui_server.url}/api/2.0/mlflow"
    experiment = get_json(f"{api}/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    assert experiment["experiment_id"] == ui_server.experiment_id
    assert experiment["artifact_location"] == (ui_server.project / "mlruns" / EXPERIMENT).as_uri()

    response = requests.post(f"{api}/runs/search", json={"experiment_ids": [ui_server.experiment_id],
                                                         "max_results": 100}, timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200, response.text[:500]
    served = {run["info"]["run_id"]: run for run in response.json().get("runs", [])}
    assert set(served) == {run.run_id for run in ui_server.runs}

    for run in ui_server.runs:
        got = served[run.run_id]
        assert got["info"]["run_name"] == run.name
        assert got["info"]["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in got["data"]["params"]} == run.params
        latest = {m["key"]: m for m in got["data"]["metrics"]}
        assert {k: m["value"] for k, m in latest.items()} == pytest.approx(run.metrics)
        assert all(latest[k]["step"] == EPOCHS for k in run.history)

        for key, values in run.history.items():
            history = get_json(f"{api}/metrics/get-history", run_id=run.run_id, metric_key=key)["metrics"]
            points = sorted((int(m["step"]), m["value"]) for m in history)
            assert [step for step, _ in points] == list(range(1, EPOCHS + 1)), key
            assert [value for _, value in points] == pytest.approx(values), key

        top = get_json(f"{api}/artifacts/list", run_id=run.run_id)
        assert top["root_uri"] == run.artifacts["config.yaml"].parent.as_uri()
        assert {(f["path"], f["is_dir"]) for f in top["files"]} == {("config.yaml", False), ("plots", True)}
        plots = get_json(f"{api}/artifacts/list", run_id=run.run_id, path="plots")["files"]
        png = run.artifacts["plots/training_curves.png"]
        assert [(f["path"], int(f["file_size"])) for f in plots] == [("plots/training_curves.png",
                                                                      png.stat().st_size)]

        for path, local in run.artifacts.items():  # the download endpoint of the UI's artifact viewer
            response = requests.get(f"{ui_server.url}/get-artifact", params={"path": path, "run_uuid": run.run_id},
                                    timeout=REQUEST_TIMEOUT)
            assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:300]}"
            assert response.content == local.read_bytes(), path
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    index = requests.get(f"{ui_server.url}/", timeout=REQUEST_TIMEOUT)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert '<div id="root"' in index.text and "<title>MLflow</title>" in index.text
    bundles = re.findall(r'<script[^>]+src="([^"]+\.js)"', index.text)
    assert bundles, index.text[:1000]
    for bundle in bundles:  # the React app itself is shipped, not just its empty shell
        script = requests.get(f"{ui_server.url}/{bundle.lstrip('./')}", timeout=REQUEST_TIMEOUT)
        assert script.status_code == 200 and len(script.content) > 100_000, bundle

    # Started from another directory, the server left nothing there (no ./mlruns, ./mlartifacts, ...).
    assert list(ui_server.cwd.iterdir()) == []


# --- the rendered UI (headless Chromium) -----------------------------------------------------------------


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def page_text(chromium: str, url: str, tmp_path: Path) -> str:
    """The visible text of the page after its scripts ran (--dump-dom, scripts and styles dropped)."""
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    dom, err = tmp_path / "dom.html", tmp_path / "chromium.log"
    with open(dom, "wb") as out, open(err, "wb") as errors:
        # own session: on timeout the whole browser (zygote, renderers) goes, not just the launcher script
        proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=errors, start_new_session=True)
        try:
            proc.wait(timeout=CHROMIUM_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT} s on {url}:\n{log_tail(err, 3000)}")
        finally:
            stop_group(proc, timeout=5)  # renderer processes outliving the browser
    noise = re.compile(r"dbus|unexpected operator")
    assert proc.returncode == 0, "\n".join(
        line for line in err.read_text(errors="replace").splitlines() if not noise.search(line))[-3000:]
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom.read_text(errors="replace"), flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


@pytest.mark.slow
def test_ui_renders_runs_in_chromium(request, tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium not installed: `apt-get install chromium` (Debian) to check the rendered UI")
    server = request.getfixturevalue("ui_server")
    base = f"{server.url}/#/experiments/{server.experiment_id}"

    # The runs table. (The bare experiment URL opens the GenAI "Overview" tab, which shows no runs.)
    text = page_text(chromium, f"{base}/runs", tmp_path)
    for run in server.runs:
        assert run.name in text, f"run {run.name!r} not rendered on {base}/runs: {text[:2000]}"

    run = server.runs[0]
    text = page_text(chromium, f"{base}/runs/{run.run_id}", tmp_path)
    assert run.name in text and "model.name" in text and run.params["model.name"] in text, text[:2000]
    assert "test_accuracy" in text and "val_accuracy" in text, text[:2000]

    text = page_text(chromium, f"{base}/runs/{run.run_id}/artifacts", tmp_path)
    assert "config.yaml" in text and "plots" in text, text[:2000]
