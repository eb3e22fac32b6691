"""The bundled MNIST copy, its checksum guard, the splits, and the offline error of the downloads."""

import numpy as np
import pytest

from experiments import PROJECT_ROOT
from experiments.errors import UserError
from experiments.run.data import load_dataset, load_npz, to_nhwc_float
from experiments.store.tracking import sqlite_path
from tests.conftest import compose_train, run_train

MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(compose_train().data)


def test_bundled_mnist_is_the_standard_split():
    (x_train, y_train), (x_test, y_test) = load_npz("data/mnist.npz", MNIST_SHA256)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.uint8
    assert x_train.min() == 0 and x_train.max() == 255
    assert np.bincount(y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(y_test).tolist() == TEST_COUNTS
    assert x_train.mean() / 255 == pytest.approx(0.1307, abs=5e-5)


def test_loader_returns_nhwc_float32_standardised_splits(mnist):
    assert mnist.x_train.shape == (55000, 28, 28, 1) and mnist.x_train.dtype == np.float32
    assert mnist.x_val.shape == (5000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.y_train.dtype == np.int64 and set(np.unique(mnist.y_val)) == set(range(10))
    assert mnist.input_shape == (28, 28, 1) and mnist.num_classes == 10
    # (x / 255 - 0.1307) / 0.3081: background maps to -0.4242, ink to 2.8215
    np.testing.assert_allclose([mnist.x_train.min(), mnist.x_train.max()], [-0.42421, 2.82154], atol=1e-4, rtol=0)
    np.testing.assert_allclose([mnist.x_train.mean(), mnist.x_train.std()], [0.0, 1.0], atol=0.01, rtol=0)
    # Validation images are the training set's last 5000; fitting and validation never overlap.
    counts = np.bincount(mnist.y_train, minlength=10) + np.bincount(mnist.y_val, minlength=10)
    assert counts.tolist() == TRAIN_COUNTS


@pytest.mark.parametrize(("shape", "mean", "std"), [
    ((50, 28, 28), [0.1307], [0.3081]),
    ((20, 32, 32, 3), [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
])
def test_standardising_by_table_gives_the_per_pixel_formulas_values(shape, mean, std):
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    images.flat[:256] = np.arange(256)  # every level
    per_pixel = (images.reshape(*shape[:3], -1).astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) \
        / np.asarray(std, np.float32)
    x = to_nhwc_float(images, mean, std)
    assert x.dtype == np.float32 and x.shape == per_pixel.shape
    np.testing.assert_array_equal(x, per_pixel)


def test_caps_take_training_images_and_keep_the_validation_set():
    full = load_dataset(compose_train().data)
    small = load_dataset(compose_train(["data.train_size=1000", "data.test_size=300", "data.val_size=2000"]).data)
    assert (len(small.x_train), len(small.x_val), len(small.x_test)) == (1000, 2000, 300)
    np.testing.assert_array_equal(small.x_train, full.x_train[:1000])
    np.testing.assert_array_equal(small.x_val, full.x_val[-2000:])


def test_missing_file_names_the_path_and_the_expected_hash(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(UserError, match=f"not found: {missing} \\(expected sha256 {MNIST_SHA256}\\)"):
        load_npz(missing, MNIST_SHA256)


def test_corrupt_file_names_the_path_and_both_hashes(tmp_path):
    corrupt = tmp_path / "mnist.npz"
    data = bytearray((PROJECT_ROOT / "data/mnist.npz").read_bytes())
    data[1000] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(UserError) as error:
        load_npz(corrupt, MNIST_SHA256)
    message = str(error.value)
    assert str(corrupt) in message and MNIST_SHA256 in message
    assert "got " in message and message.split("got ")[1][:64] != MNIST_SHA256


def test_wrong_input_shape_in_config_is_refused():
    with pytest.raises(UserError, match=r"data.input_shape is \[32, 32, 3\] but mnist images are \[28, 28, 1\]"):
        load_dataset(compose_train(["data.input_shape=[32,32,3]"]).data)


@pytest.mark.parametrize("names, given", [("[a,b]", 2), ("[0,1,2,3,4,5,6,7,8,9,10]", 11)])
def test_class_names_must_name_every_class_of_the_dataset(names, given):
    with pytest.raises(UserError) as error:
        load_dataset(compose_train([f"data.class_names={names}"]).data)
    assert str(error.value) == f"data.class_names has {given} names but the dataset mnist has 10 classes (labels 0-9)."


def test_class_names_that_do_not_fit_the_dataset_stop_train_py_in_one_line_before_any_run(tmp_path, tracking_uri):
    """Were: a run created, trained, FAILED with TensorFlow's InvalidArgumentError traceback and exit 1."""
    result = run_train(["data.class_names=[a,b]", f"tracking.uri={tracking_uri}"], tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == "error: data.class_names has 2 names but the dataset mnist has 10 classes (labels 0-9).\n"
    assert not sqlite_path(tracking_uri).exists()  # not even a store: checked before the MLflow run starts


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_download_datasets_offline_without_cache_fail_in_one_sentence(tmp_path, tracking_uri, name):
    """No cache and no network (a proxy that refuses connections): one clear line, no traceback."""
    offline = {"KERAS_HOME": str(tmp_path / "keras"), "NO_PROXY": "", "no_proxy": ""}
    for var in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"]:
        offline[var] = "http://127.0.0.1:9"
    result = run_train([f"data={name}", f"tracking.uri={tracking_uri}"], tmp_path, env=offline, timeout=300)
    assert result.returncode == 2
    assert f"error: Dataset '{name}' is not cached in {tmp_path / 'keras' / 'datasets'}" in result.stderr
    assert "use data=mnist, which ships with the project." in result.stderr
    assert "Traceback" not in result.stderr


def test_a_dataset_a_parallel_job_stored_first_is_linked_on_the_second_try(tracking_uri, monkeypatch):
    """PostgreSQL refuses the second insert of the same dataset when two jobs of a sweep log it at once
    (seen in a 4-job sweep through a PostgreSQL-backed server); the run must still get its input."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from experiments.run import data

    real, calls = mlflow.log_input, []

    def clashing_once(dataset, context):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint '
                                  '"dataset_pk"')
        real(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", clashing_once)
    mlflow.set_tracking_uri(tracking_uri)
    dataset = mlflow.data.from_numpy(np.zeros((2, 3), np.float32), name="clash")
    with mlflow.start_run() as run:
        data.log_input(dataset, "training")
    assert calls == ["training", "training"]
    [logged] = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert logged.dataset.name == "clash"

    def refusing(dataset, context):
        calls.append(context)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no such run")

    monkeypatch.setattr(mlflow, "log_input", refusing)
    with pytest.raises(MlflowException, match="no such run"):  # any other error: no second try
        data.log_input(dataset, "validation")
    assert calls[2:] == ["validation"]
