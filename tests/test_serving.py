"""A served model takes image files: ``mlflow models serve`` of a builtin and a scratch run, started as ``make serve``
starts it (the venv's bin first on PATH, ``--env-manager local``, one TensorFlow thread per worker) from a folder
outside the project, answers 50 MNIST test digits sent as PNG files as predict.py's code does on the same files,
still answers tensors, and answers each bad file with a 400 naming it, then goes on answering."""

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from PIL import Image

from experiments.apps.predict import predict_batch, prepare_file
from experiments.store.logged import load_model
from experiments.store.runs import runs_uri
from experiments.use.serving import MAX_FILE_BYTES, MAX_PIXELS
from tests.conftest import answers, free_port, stop_group, train_in_store, wait_until

pytestmark = pytest.mark.slow  # two trainings and two servers started for the module: ~1 min

MODELS = ("lenet", "lenet_scratch")
DIGITS = 50


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A temporary store with a builtin and a scratch LeNet trained with the cheapest preset (debug=tiny)."""
    return train_in_store(tmp_path_factory.mktemp("serving_store"),
                          {model: ["debug=tiny", f"model={model}"] for model in MODELS})


@pytest.fixture(scope="module")
def servers(trained, tmp_path_factory):
    """``mlflow models serve`` of each run, both started at once from a temporary folder: {model: URL}."""
    uri, runs = trained
    folder = tmp_path_factory.mktemp("serving_cwd")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    started = {}
    for model in MODELS:
        port, log = free_port(), folder / f"{model}.log"
        with open(log, "w") as out:
            started[model] = (f"http://127.0.0.1:{port}", log, subprocess.Popen(
                [str(bin_dir / "mlflow"), "models", "serve", "-m", runs_uri(runs[model]), "--env-manager", "local",
                 "--host", "127.0.0.1", "--port", str(port)],
                cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for url, log, process in started.values():
            wait_until(lambda url=url: answers(f"{url}/ping", timeout=2), 240, f"mlflow models serve on {url}",
                       process, log, interval=0.5)
        yield {model: url for model, (url, _, _) in started.items()}
    finally:
        for _, _, process in started.values():
            stop_group(process)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> list[Path]:
    """The first 50 MNIST test digits as 28×28 grayscale PNG files."""
    folder = tmp_path_factory.mktemp("digits")
    digits = np.load(Path(__file__).resolve().parent.parent / "data" / "mnist.npz")["x_test"][:DIGITS]
    paths = [folder / f"{index:02d}.png" for index in range(DIGITS)]
    for digit, path in zip(digits, paths, strict=True):
        Image.fromarray(digit).save(path)
    return paths


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def as_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post_images(url: str, files: list[bytes | str]) -> requests.Response:
    """The files (bytes, sent base64-encoded; text sent as it is) as MLflow's dataframe_split with one column."""
    rows = [[as_base64(f) if isinstance(f, bytes) else f] for f in files]
    return requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["image"], "data": rows}},
                         timeout=120)


@pytest.mark.parametrize("model", MODELS)
def test_served_model_answers_png_files_as_predict_does(trained, servers, digit_files, model):
    uri, runs = trained
    mlflow.set_tracking_uri(uri)
    loaded = load_model(runs_uri(runs[model]))
    expected = predict_batch(loaded, [prepare_file(path, loaded.data.input_shape) for path in digit_files])

    response = post_images(servers[model], [path.read_bytes() for path in digit_files])
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    assert [answer["class"] for answer in served] == [prediction.classes[0] for prediction in expected]
    for answer, prediction in zip(served, expected, strict=True):
        assert answer["probability"] == pytest.approx(prediction.probabilities[0], abs=1e-5)
        assert [top["class"] for top in answer["top3"]] == prediction.classes[:3]
        assert [top["probability"] for top in answer["top3"]] == pytest.approx(prediction.probabilities[:3], abs=1e-5)


def test_served_model_still_answers_tensors_with_or_without_the_channel_axis(trained, servers):
    uri, runs = trained
    mlflow.set_tracking_uri(uri)
    loaded = load_model(runs_uri(runs["lenet_scratch"]))
    digits = np.load(Path(__file__).resolve().parent.parent / "data" / "mnist.npz")["x_test"][:8]
    x = ((digits / 255 - loaded.data.mean[0]) / loaded.data.std[0]).astype(np.float32)[..., None]
    expected = np.asarray(loaded.model(x, training=False))
    for sent in (x, x[..., 0]):
        response = requests.post(f"{servers['lenet_scratch']}/invocations", json={"inputs": sent.tolist()},
                                 timeout=60)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.asarray(response.json()["predictions"]), expected, atol=1e-5)


def test_bad_files_get_a_400_naming_the_image_and_the_server_goes_on(servers, digit_files):
    url = servers["lenet"]
    good = digit_files[0].read_bytes()
    bad = [
        ("cannot read image 1: not an image", b"plain text, not a picture"),
        ("cannot read image 1: image file is truncated", good[:len(good) // 2]),
        ("no ink found in image 1", png(Image.new("L", (28, 28), 255))),
        ("no ink found in image 1", png(Image.new("L", (1, 1), 0))),  # once a process killer (SIGFPE)
        (f"image 1: 5001×5000 pixels, more than the limit of {MAX_PIXELS:,}", png(Image.new("L", (5001, 5000), 255))),
        ("image 1: not base64", "%%% not base64 %%%"),
    ]
    for message, file in bad:
        response = post_images(url, [good, file])
        assert response.status_code == 400, (message, response.text)
        assert message in response.json()["message"]
        after = post_images(url, [good])
        assert after.status_code == 200 and len(after.json()["predictions"]) == 1, after.text

    several = post_images(url, [b"nope", good, "%%%"])
    assert several.status_code == 400
    assert "image 0: not an image" in several.json()["message"] and "image 2: not base64" in several.json()["message"]
    for payload, message in (({"dataframe_split": {"columns": ["picture"], "data": [[as_base64(good)]]}},
                               "expected one column named 'image'"),
                              ({"inputs": [[1.0, 2.0]]}, "expected standardised pixels of shape (N, 28, 28, 1)")):
        response = requests.post(f"{url}/invocations", json=payload, timeout=60)
        assert response.status_code == 400 and message in response.json()["message"], response.text
    assert post_images(url, [good]).status_code == 200


def test_files_over_the_byte_limit_are_refused_before_they_are_read(trained):
    uri, runs = trained
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(runs_uri(runs["lenet"]))
    with pytest.raises(MlflowException, match=f"image 0: {MAX_FILE_BYTES + 1:,} bytes, more than the limit of "
                                              f"{MAX_FILE_BYTES:,}"):
        served.predict(pd.DataFrame({"image": [as_base64(bytes(MAX_FILE_BYTES + 1))]}))
