"""Predict the class of a user's images with a logged model: the workflow behind ``predict.py``.

Files are found first (a missing path fails before any model is loaded), then the model is chosen
and loaded (TensorFlow is imported then: a store that does not answer or a run that does not exist is
reported without it), then the images are read, prepared and predicted in batches. A file that cannot be
read or holds no ink is reported in one line and skipped; the others are still predicted.
``explain=<method>`` then writes, per image, the map of the pixels behind its predicted class
(``experiments.analysis.explain``) over the image the model saw; ``explain=maps`` its feature maps.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from mlflow import MlflowClient
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from tqdm import tqdm

from experiments import PROJECT_ROOT, start_up_done
from experiments.analysis import explain as explanations
from experiments.config import check_predict
from experiments.store.runs import mark_dead_runs
from experiments.store.tracking import check_store, sqlite_path
from experiments.use.choose import ModelChoice, choose_model
from experiments.use.images import ImageError, find_images, normalise, prepare, read_image
from models.architectures import conv_feature_maps, conv_layers

if TYPE_CHECKING:  # TensorFlow: imported once the model is chosen (predict)
    from experiments.store.logged import LoadedModel

TOP = 3  # classes listed per image in predictions.csv
TILE = 56  # pixels per image in preprocessed.png


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the classes by probability, best first."""

    image: Path
    classes: list[str]
    probabilities: list[float]


@dataclass(frozen=True)
class Prepared:
    """A readable image: the file, a thumbnail of it as given, and the pixels the model sees."""

    image: Path
    thumbnail: np.ndarray  # (TILE, TILE, 3) in [0, 1]
    pixels: np.ndarray  # (h, w, c) in [0, 1], before normalisation


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """The image as given, fitted into a TILE×TILE square on white (aspect ratio kept)."""
    image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    image.thumbnail((TILE, TILE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (TILE, TILE), "white")
    canvas.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    return np.asarray(canvas, np.float32) / 255


def prepare_file(path: Path, input_shape) -> Prepared:
    """Read one file and bring it into the training data's form (raises ImageError)."""
    rgb = read_image(path)
    return Prepared(path, thumbnail(rgb), prepare(rgb, input_shape, source=str(path)))


def predict_batch(loaded: LoadedModel, batch: list[Prepared]) -> list[Prediction]:
    """The model's class probabilities for prepared images, as ranked predictions."""
    data = loaded.data
    x = normalise(np.stack([item.pixels for item in batch]), data.mean, data.std)
    probabilities = np.asarray(loaded.model(x, training=False))
    predictions = []
    for item, p in zip(batch, probabilities, strict=True):
        order = np.argsort(-p, kind="stable")
        predictions.append(Prediction(item.image, [str(data.class_names[int(k)]) for k in order],
                                      [float(p[k]) for k in order]))
    return predictions


def table(predictions: list[Prediction], root: Path) -> str:
    """A plain-text table: image, predicted class and probability, runner-up and probability."""
    header = ("image", "prediction", "probability", "runner-up", "probability")
    rows = [(display_name(p.image, root), p.classes[0], f"{p.probabilities[0]:.4f}", p.classes[1],
             f"{p.probabilities[1]:.4f}") for p in predictions]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
                                                                                                      strict=True)))
             for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def display_name(path: Path, root: Path) -> str:
    """A file's path relative to the folder given (its name alone for a single file)."""
    try:
        return str(path.relative_to(root)) if root.is_dir() else path.name
    except ValueError:
        return str(path)


def write_csv(predictions: list[Prediction], path: Path, root: Path) -> None:
    """predictions.csv: image, prediction, probability, top3 ("7:0.9812 1:0.0101 2:0.0040")."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "prediction", "probability", "top3"])
        for p in predictions:
            top = " ".join(f"{c}:{q:.4f}" for c, q in zip(p.classes[:TOP], p.probabilities[:TOP], strict=True))
            writer.writerow([display_name(p.image, root), p.classes[0], f"{p.probabilities[0]:.6f}", top])


def preprocessed_grid(items: list[Prepared], predictions: list[Prediction], columns: int = 8) -> Image.Image:
    """Each input beside the image the model saw (enlarged), the predicted class under the pair."""
    label_height = 14
    cell_w, cell_h = 2 * TILE + 6, TILE + label_height + 6
    rows = -(-len(items) // columns)
    grid = Image.new("RGB", (columns * cell_w, max(rows, 1) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for index, (item, prediction) in enumerate(zip(items, predictions, strict=True)):
        x, y = (index % columns) * cell_w, (index // columns) * cell_h
        grid.paste(Image.fromarray((item.thumbnail * 255).round().astype(np.uint8)), (x, y))
        seen = (item.pixels * 255).round().astype(np.uint8)
        seen = Image.fromarray(seen.squeeze(-1) if seen.shape[-1] == 1 else seen).convert("RGB")
        grid.paste(seen.resize((TILE, TILE), Image.Resampling.NEAREST), (x + TILE + 2, y))
        draw.text((x + 2, y + TILE + 1), f"{prediction.classes[0]} {prediction.probabilities[0]:.2f}  "
                  f"{item.image.name[:10]}", fill="black")
    return grid


def explain_choice(value) -> str:
    """The ``explain`` setting as one of off, maps or a method of ``experiments.analysis.explain``: ``true`` (the
    setting before there were methods; a bool arrives as 'True' in the typed config) is maps, ``false`` off."""
    return {"true": "maps", "false": "off"}.get(str(value).lower(), str(value))


def explain(loaded: LoadedModel, item: Prepared, prediction: Prediction, path: Path) -> None:
    """Every conv layer's feature maps of one prepared image, as the training run plots them (``explain=maps``)."""
    from experiments.analysis import plots

    if not conv_layers(loaded.model):
        return
    x = normalise(item.pixels, loaded.data.mean, loaded.data.std)
    fig = plots.feature_maps(x, conv_feature_maps(loaded.model, x), f"predicted {prediction.classes[0]}")
    fig.savefig(path, dpi=100)


def explain_answers(loaded: LoadedModel, items: list[Prepared], predictions: list[Prediction], method: str,
                    folder: Path, batch_size: int) -> None:
    """``method``'s map of each image's predicted class over the image the model saw, one PNG per image in
    ``folder`` (``<index>-<file name>.png``), computed ``batch_size`` images at a time. Integrated Gradients
    starts from the blank page: the normalised 0-intensity image (``explain.blank``)."""
    from experiments.analysis import plots

    data = loaded.data
    names = [str(name) for name in data.class_names]
    baseline = explanations.blank(data.mean, data.std)
    for start in range(0, len(items), batch_size):
        batch, answers = items[start:start + batch_size], predictions[start:start + batch_size]
        x = normalise(np.stack([item.pixels for item in batch]), data.mean, data.std)
        classes = [names.index(answer.classes[0]) for answer in answers]
        maps = explanations.explain(loaded.model, x, classes, method, baseline)
        for index, (item, answer, image, heat) in enumerate(zip(batch, answers, x, maps, strict=True), start):
            name = item.image.name if len(item.image.name) <= 20 else f"{item.image.name[:17]}..."
            fig = plots.explanation(image, heat, explanations.TITLES[method],
                                    f"why {answer.classes[0]}? (p = {answer.probabilities[0]:.2f})",
                                    method in explanations.SIGNED, name)
            fig.savefig(folder / f"{index:04d}-{item.image.stem}.png", dpi=200)  # 3 tiles: ~700 px wide


def mark_dead_runs_of(uri: str, experiment: str) -> None:
    """Mark this host's runs of the experiment whose process is gone KILLED, in an existing store only:
    a prediction never creates one."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        mark_dead_runs(client, [found.experiment_id])


def default_output_dir() -> Path:
    return PROJECT_ROOT / "reports" / f"predict-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def predict(cfg: DictConfig) -> int:
    """Run predict.py's configuration; returns the exit code (1 when any file failed)."""
    check_predict(cfg)
    files = find_images(str(cfg.images), recursive=cfg.recursive)
    root = Path(str(cfg.images)).expanduser()
    uri = check_store(cfg.tracking.uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    mark_dead_runs_of(uri, cfg.tracking.experiment)
    choice: ModelChoice = choose_model(uri, cfg.tracking.experiment, cfg.model_uri, cfg.run_id, cfg.model.name)
    print(f"model: {choice.uri} ({choice.reason})", flush=True)
    from experiments.store.logged import load_model

    loaded = load_model(choice.uri)
    start_up_done()

    prepared, predictions, failed = [], [], 0
    for start in tqdm(range(0, len(files), cfg.batch_size), desc="predicting", unit="batch", disable=None):
        batch = []
        for path in files[start:start + cfg.batch_size]:
            try:
                batch.append(prepare_file(path, loaded.data.input_shape))
            except ImageError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
        if batch:
            prepared.extend(batch)
            predictions.extend(predict_batch(loaded, batch))

    output_dir = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    if predictions:
        print(table(predictions, root))
        write_csv(predictions, output_dir / "predictions.csv", root)
        preprocessed_grid(prepared, predictions).save(output_dir / "preprocessed.png")
        method = explain_choice(cfg.explain)
        if method != "off":
            (output_dir / "explain").mkdir(exist_ok=True)
        if method == "maps":
            for index, (item, prediction) in enumerate(zip(prepared, predictions, strict=True)):
                explain(loaded, item, prediction, output_dir / "explain" / f"{index:04d}-{item.image.stem}.png")
        elif method != "off":
            explain_answers(loaded, prepared, predictions, method, output_dir / "explain", cfg.batch_size)
    summary = f"{len(predictions)} of {len(files)} images predicted"
    print(f"{summary}{f', {failed} failed' if failed else ''}; results in {output_dir}")
    return 1 if failed else 0


def main(cfg: DictConfig) -> None:
    """``python predict.py``: exit code 1 when any image failed."""
    sys.exit(predict(cfg))
