"""predict.py end to end: a user's photos of digits in, the model's answers out; bad input in one line."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from experiments import PROJECT_ROOT
from experiments.apps.predict import predict
from experiments.errors import UserError
from experiments.run.data import load_dataset
from experiments.store.logged import load_model
from experiments.store.runs import runs_uri
from tests.conftest import CONF_DIR, compose_train, train_in_store
from tests.image_fixtures import write_photo_folder


def compose_predict(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="predict", overrides=list(overrides))


def run_predict(args, cwd: Path, uri: str) -> subprocess.CompletedProcess:
    """``python predict.py ARGS`` from an unrelated directory against the store at ``uri``."""
    cmd = [sys.executable, str(PROJECT_ROOT / "predict.py"), *args, f"tracking.uri={uri}",
           f"hydra.run.dir={cwd}/hydra"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet good enough to read digits (3 epochs on 20,000 images, ~97 %), in a temporary store."""
    uri, runs = train_in_store(tmp_path_factory.mktemp("predict_store"),
                               {"lenet": ["data.train_size=20000", "data.test_size=1000", "trainer.epochs=3",
                                          "trainer.plots=false"]})
    return uri, runs["lenet"]


@pytest.fixture(scope="module")
def mnist_test():
    data = load_dataset(compose_train(["data.train_size=100"]).data)
    raw = np.load(PROJECT_ROOT / "data" / "mnist.npz")["x_test"]
    return data.x_test, data.y_test, raw


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_photos_of_1000_test_digits_get_the_answers_of_the_original_digits(store, mnist_test, tmp_path):
    """Each digit enlarged x3-x8, dark ink on light paper, off-centre, on an uneven background, as
    PNG and JPEG: predict.py must agree with the model on the original images for >= 98 % of them."""
    uri, run_id = store
    x_test, _, raw = mnist_test
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = write_photo_folder(folder, raw[:1000], np.random.default_rng(0))
    result = run_predict([f"images={folder}", f"run_id={run_id}", f"output_dir={tmp_path}/out"], tmp_path, uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0].startswith(f"model: {runs_uri(run_id)} (lenet, given as run_id)")
    rows = {row["image"]: row for row in read_csv(tmp_path / "out" / "predictions.csv")}
    assert len(rows) == 1000
    original = np.asarray(load_model(runs_uri(run_id)).model(x_test[:1000], training=False)).argmax(1)
    answers = np.array([int(rows[path.name]["prediction"]) for path in paths])
    agreement = (answers == original).mean()
    print(f"agreement with the original digits: {agreement:.4f}")
    assert agreement >= 0.98
    for fmt in ("png", "jpg"):
        chosen = np.array([path.suffix == f".{fmt}" for path in paths])
        assert (answers[chosen] == original[chosen]).mean() >= 0.97, fmt
    assert Image.open(tmp_path / "out" / "preprocessed.png").width >= 800


def test_one_file_prints_the_model_a_table_and_writes_csv_grid_and_feature_maps(store, mnist_test, tmp_path, capsys):
    uri, run_id = store
    _, y_test, raw = mnist_test
    write_photo_folder(tmp_path, raw[:1], np.random.default_rng(1), formats=("png",))
    image = tmp_path / "0000.png"
    cfg = compose_predict([f"images={image}", f"tracking.uri={uri}", f"output_dir={tmp_path}/out", "explain=true"])
    assert predict(cfg) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"model: {runs_uri(run_id)} (lenet, best val_accuracy ")
    assert lines[0].endswith(" of 1 runs)")
    assert lines[1].split() == ["image", "prediction", "probability", "runner-up", "probability"]
    name, prediction, probability, runner_up, runner_up_probability = lines[2].split()
    assert name == "0000.png" and prediction == str(y_test[0])
    assert 0 <= float(runner_up_probability) <= float(probability) <= 1 and runner_up != prediction
    (row,) = read_csv(tmp_path / "out" / "predictions.csv")
    assert list(row) == ["image", "prediction", "probability", "top3"]
    top3 = [entry.split(":") for entry in row["top3"].split()]
    assert len(top3) == 3 and top3[0][0] == prediction
    assert [float(p) for _, p in top3] == sorted((float(p) for _, p in top3), reverse=True)
    assert Image.open(tmp_path / "out" / "preprocessed.png").size[1] > 56
    explained = list((tmp_path / "out" / "explain").glob("*.png"))
    assert [p.name for p in explained] == ["0000-0000.png"]
    assert Image.open(explained[0]).width <= 1000  # readable at the MLflow viewer's width


def test_a_folder_with_bad_files_predicts_and_explains_the_good_ones_and_exits_1(store, mnist_test, tmp_path):
    """Through the command line, with explain=gradcam: one overlay per predicted image in explain/."""
    uri, run_id = store
    _, _, raw = mnist_test
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_photo_folder(folder, raw[:3], np.random.default_rng(2))
    (folder / "notes.png").write_text("not an image")
    good = (folder / "0000.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (64, 64), 255).save(folder / "blank.png")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    result = run_predict([f"images={folder}", f"run_id={run_id}", f"output_dir={tmp_path}/out", "explain=gradcam"],
                         tmp_path, uri)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, result.stderr
    for name in ("notes.png", "cut.png", "blank.png"):
        assert sum(name in line for line in errors) == 1, (name, errors)
    assert "Traceback" not in result.stderr
    assert sorted(row["image"] for row in read_csv(tmp_path / "out" / "predictions.csv")) == [
        "0000.png", "0001.jpg", "0002.png"]
    assert "3 of 6 images predicted, 3 failed" in result.stdout
    overlays = sorted((tmp_path / "out" / "explain").glob("*.png"))
    assert [p.name for p in overlays] == ["0000-0000.png", "0001-0001.png", "0002-0002.png"]
    assert all(Image.open(p).width <= 1000 for p in overlays)


@pytest.mark.parametrize("images, message", [
    ("{tmp}/nowhere", "{tmp}/nowhere"),
    ("{tmp}/empty", "no images in {tmp}/empty"),
    ("'{tmp}/empty/*.png'", "{tmp}/empty/*.png"),
])
def test_missing_or_empty_image_paths_fail_before_any_model_is_loaded(images, message, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = compose_predict([f"images={images.format(tmp=tmp_path)}", f"tracking.uri=sqlite:///{tmp_path}/none.db"])
    with pytest.raises(UserError, match=message.format(tmp=tmp_path).replace("*", r"\*")):
        predict(cfg)
    assert not (tmp_path / "none.db").exists()


def test_bad_model_choices_are_one_line_errors(store, mnist_test, tmp_path):
    uri, run_id = store
    _, _, raw = mnist_test
    write_photo_folder(tmp_path, raw[:1], np.random.default_rng(3), formats=("png",))
    unknown = run_predict([f"images={tmp_path}/0000.png", "run_id=0123456789abcdef"], tmp_path, uri)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1] == f"error: run_id '0123456789abcdef': no such run in {uri}."
    assert "Traceback" not in unknown.stderr
    cfg = compose_predict([f"images={tmp_path}/0000.png", f"tracking.uri={uri}", "model_uri=models:/nothing@champion"])
    with pytest.raises(UserError, match="model models:/nothing@champion: cannot be found"):
        predict(cfg)
    with pytest.raises(UserError, match="batch_size must be an integer >= 1, got 0"):
        predict(compose_predict([f"images={tmp_path}", "batch_size=0"]))
    with pytest.raises(UserError, match="images must be a file"):
        predict(compose_predict([]))
