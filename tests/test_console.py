"""What a user sees of a run: no start-up chatter from TensorFlow, CUDA, absl or MLflow; a first line that says
what is trained on what and where it is logged; the run id, test metrics and the run's page last; real
errors still shown. And the run's time breakdown in its metrics. predict.py and compare.py print their own lines
only too: no MLflow "Downloading artifacts" bars (their carriage-return frames), no TensorFlow noise."""

import os
import re
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from experiments import PROJECT_ROOT
from experiments.store.tracking import run_page, shown_uri

TINY = ["debug=tiny", "trainer.plots=true"]  # a whole run as a user has it: plots too

NOISE = [
    r"Could not find cuda drivers on your machine",  # the CUDA runtime stub, as each TF library loads
    r"failed call to cuInit",  # no NVIDIA driver
    r"All log messages before absl::InitializeLog\(\) is called",
    r"This TensorFlow binary is optimized to use available CPU instructions",
    r"To enable the following instructions",
    r"oneDNN custom operations are on",
    r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\]",  # any other line of TensorFlow's C++ log
    r"Creating initial MLflow database tables",
    r"Updating database tables",
    r"Downloading artifacts",
    r"View run .* at: ",  # MLflow's own run link (the last line gives it)
    r"\w+Warning: ",  # UserWarning, DeprecationWarning, ... from Python
    r"Traceback \(most recent call last\)",
]

HEADLINE = re.compile(r"lenet \(builtin layers\) on mnist: 256 train / 256 val / 256 test images, on (CPU|GPU) → "
                      r"run (?P<run_id>[0-9a-f]{32}) in experiment lenet-lab, (?P<uri>sqlite:///\S+/mlflow\.db)")


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of the settings train.py makes itself (the tests' own
    TF_CPP_MIN_LOG_LEVEL, a fallback MLFLOW_TRACKING_URI)."""
    return {key: value for key, value in os.environ.items() if not key.startswith(("TF_CPP_", "MLFLOW_"))}


def train_py(args: list[str], tmp_path, command: str = "train") -> subprocess.CompletedProcess:
    """``python <command>.py ARGS`` as a user runs it, from ``tmp_path``."""
    cmd = [sys.executable, str(PROJECT_ROOT / f"{command}.py"), *args, f"hydra.run.dir={tmp_path}/hydra-{command}"]
    return subprocess.run(cmd, cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `python train.py` of 256 images and one epoch, as a user starts it; with its wall time."""
    tmp_path = tmp_path_factory.mktemp("console")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    started = time.monotonic()
    result = train_py([*TINY, f"tracking.uri={uri}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return uri, result, time.monotonic() - started


@pytest.fixture(scope="module")
def predicted(tiny_run, tmp_path_factory):
    """`python predict.py` of one image with the tiny run's model, as a user starts it: the model's artifacts are
    downloaded (MLflow's "Downloading artifacts" bars, unless turned off)."""
    from PIL import Image, ImageDraw

    uri, _, _ = tiny_run
    tmp_path = tmp_path_factory.mktemp("predict_console")
    image = Image.new("L", (56, 56), 255)
    ImageDraw.Draw(image).line((28, 8, 28, 48), fill=0, width=6)  # a 1
    image.save(tmp_path / "digit.png")
    result = train_py([f"images={tmp_path / 'digit.png'}", f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}"],
                      tmp_path, "predict")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def compared(tiny_run, tmp_path_factory):
    """`python compare.py` of the tiny run's store, as a user starts it."""
    uri, _, _ = tiny_run
    tmp_path = tmp_path_factory.mktemp("compare_console")
    result = train_py([f"tracking.uri={uri}", f"output_dir={tmp_path / 'report'}"], tmp_path, "compare")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(params=["train", "predict", "compare"])
def console(request) -> subprocess.CompletedProcess:
    """What a command printed: train.py's tiny run, predict.py and compare.py on its store."""
    if request.param == "train":
        return request.getfixturevalue("tiny_run")[1]
    return request.getfixturevalue({"predict": "predicted", "compare": "compared"}[request.param])


@pytest.mark.parametrize("pattern", NOISE)
def test_a_command_prints_no_start_up_chatter(console, pattern):
    for name, output in (("stdout", console.stdout), ("stderr", console.stderr)):
        assert not re.search(pattern, output, re.M), f"{pattern!r} in {name}:\n{output[-3000:]}"


def test_a_command_prints_no_progress_bar_frames(console):
    """A bar redrawn in place (tqdm, MLflow's artifact downloads) leaves carriage returns in a captured console."""
    assert "\r" not in console.stdout + console.stderr, (console.stdout + console.stderr)[-3000:]


def test_predict_and_compare_print_their_own_lines_only(tiny_run, predicted, compared):
    uri, train, _ = tiny_run
    run_id = HEADLINE.match(train.stdout)["run_id"]
    assert predicted.stderr == "" and compared.stderr == ""
    lines = predicted.stdout.splitlines()
    assert lines[0].startswith(f"model: runs:/{run_id}/model (")
    assert lines[-1].startswith("1 of 1 images predicted; results in ")
    assert any(line.startswith("| lenet ") for line in compared.stdout.splitlines()), compared.stdout


def test_the_first_line_says_what_is_trained_and_where_it_is_logged_the_last_ones_the_results(tiny_run):
    uri, result, _ = tiny_run
    lines = result.stdout.splitlines()
    headline = HEADLINE.fullmatch(lines[0])
    assert headline, lines[0]
    run = MlflowClient(uri).get_run(headline["run_id"])
    assert headline["uri"] == uri
    assert lines[-3] == f"MLflow run id: {run.info.run_id}"
    assert lines[-2] == (f"test_loss={run.data.metrics['test_loss']:.4f} "
                         f"test_accuracy={run.data.metrics['test_accuracy']:.4f}")
    assert lines[-1] == (f"run page: http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/"
                         f"{run.info.run_id} (make ui STORE={uri})")


def test_a_run_logs_where_its_time_went(tiny_run):
    uri, result, wall_seconds = tiny_run
    run_id = HEADLINE.match(result.stdout)["run_id"]
    metrics = MlflowClient(uri).get_run(run_id).data.metrics
    parts = [metrics[f"{part}_seconds"] for part in ("setup", "fit", "evaluate", "logging")]
    assert all(seconds > 0 for seconds in parts), metrics
    assert metrics["setup_seconds"] > 1  # from the process's start: the imports of TensorFlow and MLflow alone
    assert sum(parts) < wall_seconds
    assert metrics["train_seconds"] == metrics["fit_seconds"]


def test_a_bad_setting_still_shows_its_one_line(tmp_path):
    result = train_py(["seed=abc"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: seed must be an integer in [0, 4294967295], got 'abc'.\n"


def test_tensorflows_start_up_filter_drops_only_the_noise_and_keeps_what_a_crash_printed(tmp_path):
    """The lines pass through a separate process: what a process printed before it aborted still shows."""
    code = """
import os
from experiments import TF_STARTUP_NOISE, stderr_without
with stderr_without(TF_STARTUP_NOISE):
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1795.5   11 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU "
                b"will not be used.\\n")
    os.write(2, b"E0000 00:00:1795.5   11 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
                b"Failed call to cuInit: UNKNOWN ERROR (303)\\n")
    os.write(2, b"E0000 00:00:1795.5   11 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE\\n")
    os.write(2, b"F0000 00:00:1795.5   11 cpu_feature_guard.cc:1] Check failed: a real error")
    os.abort()
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**user_env(), "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode < 0  # aborted
    assert result.stderr.splitlines() == [
        "E0000 00:00:1795.5   11 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE",
        "F0000 00:00:1795.5   11 cpu_feature_guard.cc:1] Check failed: a real error"]


@pytest.mark.parametrize("uri, page", [
    ("http://mlflow.lab:5000/", "http://mlflow.lab:5000/#/experiments/3/runs/abc"),
    ("https://u:secret@mlflow.lab", "https://u:***@mlflow.lab/#/experiments/3/runs/abc"),
    (f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}", "http://127.0.0.1:5000/#/experiments/3/runs/abc (make ui)"),
    ("sqlite:////data/runs.db", "http://127.0.0.1:5000/#/experiments/3/runs/abc (make ui STORE=sqlite:////data/runs.db)"),
])
def test_the_run_page_is_on_the_tracking_server_or_in_make_ui(uri, page):
    assert run_page(uri, "3", "abc") == page


def test_a_tracking_uri_is_shown_without_its_password():
    assert shown_uri("postgresql://lab:s3cret@db/mlflow") == "postgresql://lab:***@db/mlflow"
    assert shown_uri("sqlite:////data/runs.db") == "sqlite:////data/runs.db"


# What makes MLflow think it runs in CI or a test, where it reports nothing anyway (mlflow/telemetry/utils.py).
CI_MARKERS = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
              "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
              "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID")


@pytest.mark.parametrize(("setting", "reports"), [(None, False), ("false", True)])
def test_mlflow_reports_no_usage_unless_the_user_turns_it_on(setting, reports):
    """As in a user's shell (no CI variables): our code turns MLflow's usage reports off before MLflow starts
    them; a user's own MLFLOW_DISABLE_TELEMETRY=false wins."""
    env = {key: value for key, value in user_env().items() if key not in CI_MARKERS and key != "DO_NOT_TRACK"}
    if setting is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = setting
    probe = ("import experiments, mlflow\nfrom mlflow.telemetry.client import get_telemetry_client\n"
             "print(get_telemetry_client() is not None)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == str(reports)


@pytest.mark.parametrize(("collector_at_start", "expected"), [("off", "True True"), ("on", "True False")])
def test_the_end_of_start_up_turns_the_collector_on_without_the_start_ups_objects(collector_at_start, expected):
    """train.py starts with the garbage collector off; start_up_done() freezes what is alive and turns it on again.
    Where it was on, nothing is frozen."""
    probe = ("import gc\n" + ("gc.disable()\n" if collector_at_start == "off" else "")
             + "import tensorflow\nfrom experiments import start_up_done\nstart_up_done()\n"
             "print(gc.isenabled(), gc.get_freeze_count() > 100_000)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=user_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == expected
