"""Logged models load anywhere: in a Python process that cannot import this project, through
``mlflow.pyfunc`` and ``mlflow models serve``; and the model a command picks by default."""

import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from experiments.apps.predict import predict_batch, prepare_file
from experiments.errors import UserError
from experiments.run.data import load_dataset
from experiments.store.logged import load_model
from experiments.store.runs import runs_uri
from experiments.use.choose import choose_model
from tests.conftest import answers, compose_train, free_port, train_in_store, wait_until

QUICK = ["data.train_size=2000", "data.test_size=200", "trainer.epochs=1", "data.max_shift=0", "trainer.plots=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A temporary store with one builtin and one scratch LeNet run (1 epoch on 2,000 images)."""
    return train_in_store(tmp_path_factory.mktemp("models_store"),
                          {model: [*QUICK, f"model={model}"] for model in ("lenet", "lenet_scratch")})


@pytest.fixture(scope="module")
def test_images():
    data = load_dataset(compose_train(["data.train_size=100", "data.test_size=20"]).data)
    return data.x_test[:20], data.y_test[:20]


@pytest.fixture(scope="module")
def foreign_python(tmp_path_factory) -> Path:
    """A virtual environment that sees this venv's packages but not the project: the packages'
    folder is added by a .pth line, whose own .pth files (the editable install's finder among
    them) are not run. Its bin/ has ``mlflow`` and ``uvicorn`` running on its own Python."""
    venv = tmp_path_factory.mktemp("foreign") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name, main in (("mlflow", "from mlflow.cli import cli as main"), ("uvicorn", "from uvicorn.main import main")):
        script = venv / "bin" / name
        script.write_text(f"#!{python}\nimport sys\n{main}\nsys.exit(main())\n")
        script.chmod(0o755)
    return python


def run_foreign(python: Path, code: str, uri: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("PYTHONPATH", None)
    prelude = ("import importlib.util\n"
               "assert importlib.util.find_spec('models') is None, 'the project is importable'\n"
               "assert importlib.util.find_spec('experiments') is None, 'the project is importable'\n")
    return subprocess.run([python, "-c", prelude + code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def expected_probabilities(uri: str, run_id: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(load_model(runs_uri(run_id)).model(x, training=False))


@pytest.mark.parametrize("model", ["lenet", "lenet_scratch"])
def test_a_logged_model_loads_where_the_project_cannot_be_imported(store, test_images, foreign_python, tmp_path,
                                                                   model):
    """Tensors, and a PNG file prepared by the copy of experiments/use/images.py the model carries."""
    uri, runs = store
    x, _ = test_images
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", expected_probabilities(uri, runs[model], x))
    digit = np.load("data/mnist.npz")["x_test"][0]
    Image.fromarray(digit).save(tmp_path / "digit.png")
    loaded = load_model(runs_uri(runs[model]))
    [expected_answer] = predict_batch(loaded, [prepare_file(tmp_path / "digit.png", loaded.data.input_shape)])
    code = f"""
import mlflow, numpy as np, pandas as pd
from pathlib import Path
x, expected = np.load("x.npy"), np.load("expected.npy")
pyfunc = mlflow.pyfunc.load_model("{runs_uri(runs[model])}")
np.testing.assert_allclose(pyfunc.predict(x), expected, atol=1e-5)
[answer] = pyfunc.predict(pd.DataFrame({{"image": [Path("digit.png").read_bytes()]}})).to_dict("records")
assert answer["class"] == "{expected_answer.classes[0]}", answer
assert abs(answer["probability"] - {expected_answer.probabilities[0]}) < 1e-5, answer
keras_model = pyfunc.get_raw_model()
print("layers:", [type(layer).__name__ for layer in keras_model.layers])
keras_model = mlflow.keras.load_model("{runs_uri(runs[model])}")
np.testing.assert_allclose(keras_model.predict(x, verbose=0), expected, atol=1e-5)
print("ok")
"""
    result = run_foreign(foreign_python, code, uri, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
    layer_types = result.stdout.split("layers:")[1]
    assert ("ScratchConv2D" in layer_types) == (model == "lenet_scratch")


def test_logged_model_keeps_input_example_data_settings_and_code(store):
    """No signature (the served model takes tensors and image files: experiments/use/serving.py); the code its
    pyfunc flavor runs is a copy of the project's."""
    uri, runs = store
    info = mlflow.models.get_model_info(runs_uri(runs["lenet_scratch"]))
    assert info.signature is None
    assert info.flavors["python_function"]["loader_module"] == "experiments.use.serving"
    assert info.saved_input_example_info["type"] == "ndarray"
    example = mlflow.models.Model.load(runs_uri(runs["lenet_scratch"])).load_input_example()
    assert example.shape == (3, 28, 28, 1) and example.std() > 0.5  # real standardised digits
    meta = info.metadata["lenet_lab"]
    assert meta["model"] == "lenet_scratch" and meta["layers"] == "scratch"
    assert meta["input_shape"] == [28, 28, 1] and meta["mean"] == [0.1307] and meta["std"] == [0.3081]
    local = Path(mlflow.artifacts.download_artifacts(runs_uri(runs["lenet_scratch"])))
    for module in ("models/layers.py", "experiments/use/serving.py", "experiments/use/images.py",
                   "experiments/errors.py"):
        assert (local / "code" / module).read_text() == Path(module).read_text(), module
    assert {path.name for path in (local / "code" / "experiments").rglob("*.py")} == {
        "__init__.py", "errors.py", "images.py", "serving.py"}  # the lab's other modules stay home


def test_a_model_is_logged_with_the_running_versions_without_scanning_the_installed_packages(store_uri,
                                                                                             monkeypatch):
    """The pins are the running versions, so MLflow's check of them (a map of every installed distribution's
    files) is skipped; MLflow's requirements files still carry them."""
    import PIL
    import tensorflow as tf
    from mlflow.utils import requirements_utils

    from experiments.store.logged import log_model

    scans = []
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # as in a new process
    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", lambda: scans.append(1))
    cfg = compose_train(["model=lenet"])
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    examples = np.zeros((3, 28, 28, 1), np.float32)
    mlflow.set_tracking_uri(store_uri)
    with mlflow.start_run() as run:
        log_model(model, cfg, examples, model.predict(examples, verbose=0))
    assert not scans, "MLflow mapped the installed packages while the model was logged"
    requirements = Path(mlflow.artifacts.download_artifacts(f"{runs_uri(run.info.run_id)}/requirements.txt"))
    assert requirements.read_text().split() == [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}",
                                                f"mlflow=={mlflow.__version__}", f"pillow=={PIL.__version__}"]


def test_a_model_logged_before_image_files_loads_where_the_projects_models_are_imported(tmp_path):
    """Such a model names ``models.mlflow_loader`` as its pyfunc loader; in a process that has imported this
    project's ``models`` package (as any session using the lab has), that name is looked up in the project."""
    import models.layers  # noqa: F401

    keras_model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                    keras.layers.Dense(10, activation="softmax")])
    x = np.random.default_rng(0).normal(size=(3, 28, 28, 1)).astype(np.float32)
    path = str(tmp_path / "logged_before")
    signature = mlflow.models.infer_signature(x, keras_model.predict(x, verbose=0))
    mlflow.keras.save_model(keras_model, path, signature=signature)
    mlmodel = mlflow.models.Model.load(path)
    mlmodel.flavors["python_function"]["loader_module"] = "models.mlflow_loader"
    mlmodel.save(str(Path(path) / "MLmodel"))
    np.testing.assert_allclose(mlflow.pyfunc.load_model(path).predict(x), keras_model(x), atol=1e-6)


def test_run_logs_dataset_inputs_and_a_description(store):
    uri, runs = store
    run = MlflowClient(uri).get_run(runs["lenet"])
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    assert inputs["training"].name == "mnist-train" and inputs["test"].name == "mnist-test"
    assert json.loads(inputs["training"].source)["uri"].endswith("data/mnist.npz")
    assert len(inputs["training"].digest) >= 8
    assert inputs["training"].digest != inputs["test"].digest
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith("lenet (builtin layers) on mnist, 2,000 training images, 1 epochs: test accuracy")


# --- Serving -----------------------------------------------------------------------------------------


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_mnist_digits_for_builtin_and_scratch_runs(store, test_images, foreign_python,
                                                                               tmp_path):
    """Both servers start at once, in the environment without the project, on free ports."""
    uri, runs = store
    x, _ = test_images
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{foreign_python.parent}:{os.environ['PATH']}"}
    servers = {}
    for model in ("lenet", "lenet_scratch"):
        port = free_port()
        cmd = [str(foreign_python.parent / "mlflow"), "models", "serve", "-m", runs_uri(runs[model]),
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
        servers[model] = (port, subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        for model, (port, process) in servers.items():
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda url=url: answers(f"{url}/ping", timeout=2), 180, f"mlflow models serve on {url}", process,
                       interval=0.5)
            answer = post_json(f"{url}/invocations", {"inputs": x.tolist()})
            probabilities = np.asarray(answer["predictions"])
            expected = expected_probabilities(uri, runs[model], x)
            assert probabilities.shape == (20, 10)
            np.testing.assert_allclose(probabilities, expected, atol=1e-5)
            assert list(probabilities.argmax(1)) == list(expected.argmax(1))
    finally:
        for _, process in servers.values():
            os.killpg(process.pid, 15)
            process.wait(timeout=30)


# --- Choosing the model --------------------------------------------------------------------------------


def test_default_model_is_the_best_finished_run_by_validation_accuracy(store):
    uri, runs = store
    client = MlflowClient(uri)
    best = max(runs.values(), key=lambda r: (client.get_run(r).data.metrics["val_accuracy"],
                                             client.get_run(r).info.start_time))  # ties: the later run
    choice = choose_model(uri, "lenet-lab", None, None, "lenet")
    assert choice.uri == runs_uri(best)
    accuracy = client.get_run(best).data.metrics["val_accuracy"]
    assert choice.reason.endswith(f"best val_accuracy {accuracy:.4f} of 2 runs")


def test_model_given_by_uri_or_run_id(store):
    uri, runs = store
    assert choose_model(uri, "lenet-lab", "models:/x@y", None, "lenet").uri == "models:/x@y"
    choice = choose_model(uri, "lenet-lab", None, runs["lenet_scratch"], "lenet")
    assert choice.uri == runs_uri(runs["lenet_scratch"]) and choice.reason.startswith("lenet_scratch")
    with pytest.raises(UserError, match="run_id 'nope': no such run"):
        choose_model(uri, "lenet-lab", None, "nope", "lenet")
    with pytest.raises(UserError, match="not both"):
        choose_model(uri, "lenet-lab", "models:/x@y", runs["lenet"], "lenet")


def test_no_model_in_the_store_tells_the_user_to_train(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(UserError, match="make train"):
        choose_model(uri, "lenet-lab", None, None, "lenet")


def test_load_model_errors_are_one_line_user_errors(store, tmp_path):
    uri, runs = store
    with pytest.raises(UserError, match=r"model models:/missing@champion: cannot be found"):
        load_model("models:/missing@champion")
    with pytest.raises(UserError, match=f"model {tmp_path}: cannot be found"):
        load_model(str(tmp_path))
    with mlflow.start_run(experiment_id=MlflowClient(uri).get_experiment_by_name("lenet-lab").experiment_id) as run:
        pass
    with pytest.raises(UserError, match=f"runs:/{run.info.run_id}/model: cannot be found"):
        load_model(runs_uri(run.info.run_id))
    tabular = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    mlflow.keras.save_model(tabular, str(tmp_path / "tabular"),
                            signature=mlflow.models.infer_signature(np.zeros((1, 4), np.float32)))
    with pytest.raises(UserError, match="its input is not an image"):
        load_model(str(tmp_path / "tabular"))
