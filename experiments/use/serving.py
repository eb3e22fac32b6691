"""What ``mlflow models serve`` (and ``mlflow.pyfunc.load_model``) runs for every model this lab logs: class
probabilities for tensors, and for image files a class, its probability and the top 3, after ``predict.py``'s own
preprocessing.

Every logged model names this module as its pyfunc ``loader_module`` and carries a copy of it in its ``code/``
folder, with what it imports: ``experiments/use/images.py``, ``experiments/errors.py`` and the ``models`` package
(``experiments.store.logged.copy_model_code``). MLflow puts ``code/`` first on ``sys.path`` and calls
``_load_pyfunc``, so the scratch layers are registered before Keras reads the model file, and images are prepared
by the same functions as in ``predict.py``, in any process, with or without this project.

Two forms of request, in any of MLflow's JSON forms (``inputs``, ``instances``, ``dataframe_split``,
``dataframe_records``; CSV too for images):

    {"inputs": <N×28×28×1 (or N×28×28) standardised pixels>}  ->  {"predictions": <N×10 probabilities>}
    {"dataframe_split": {"columns": ["image"], "data": [["<base64 PNG, JPEG, ...>"], ...]}}
        ->  {"predictions": [{"class": "7", "probability": 0.98, "top3": [{"class": "7", "probability": 0.98},
                                                                          ...]}, ...]}

The MLmodel has no signature: MLflow enforces a signature before ``predict`` sees the data, and one signature
cannot describe tensors and a column of files. ``predict`` checks both forms itself: a request with tensors of
the wrong shape, or with any image that is not base64, not an image, truncated, blank, or over MAX_FILE_BYTES or
MAX_PIXELS, fails as a whole with an ``MlflowException`` (INVALID_PARAMETER_VALUE: HTTP 400 from the server)
naming each bad image by its position in the request and what is wrong with it.
"""

import base64
import binascii
import gc
import io
import sys

import keras
import mlflow.keras
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.models import Model

import models.layers  # noqa: F401  (registers ScratchConv2D & co. with Keras on import)
from experiments.use.images import ImageError, normalise, prepare, read_image

METADATA_KEY = "lenet_lab"  # the MLmodel metadata with the data settings (experiments.store.logged.data_metadata)
IMAGE_COLUMN = "image"
TOP = 3  # classes per image in an answer
# Limits per image file: its bytes, and its pixels (read from the header before decoding), so that one request
# cannot take the server's memory: 25 megapixels is a 6000×4000 photo, ~0.5 GB while it is prepared.
MAX_FILE_BYTES = 20 * 2**20
MAX_PIXELS = 25_000_000
# The module uvicorn imports in `mlflow models serve`: while it is being imported, the model is loaded for a
# scoring server.
SCORING_APP = "mlflow.pyfunc.scoring_server.app"


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and ``message``."""
    return MlflowException.invalid_parameter_value(message)


def file_bytes(value, source: str) -> bytes:
    """An image file sent as base64 text (whitespace ignored: ``base64 -w0`` and MIME's 76-column lines alike),
    or as bytes (in-process callers, MLflow's binary columns)."""
    if isinstance(value, str):
        try:
            value = base64.b64decode("".join(value.split()), validate=True)
        except binascii.Error as e:
            raise ImageError(f"{source}: not base64 ({e})") from None
    if not isinstance(value, bytes):
        raise ImageError(f"{source}: expected an image file as base64 text, got {type(value).__name__}")
    if len(value) > MAX_FILE_BYTES:
        raise ImageError(f"{source}: {len(value):,} bytes, more than the limit of {MAX_FILE_BYTES:,}")
    return value


def image_column(data) -> list | None:
    """The files of a request in the image form, a column ``image`` (a DataFrame, or the dict MLflow makes of
    ``{"inputs": {"image": [...]}}`` and ``instances``); None for any other data (tensors)."""
    if isinstance(data, pd.DataFrame):
        columns = list(data.columns)
    elif isinstance(data, dict):
        columns = list(data)
    else:
        return None
    if columns != [IMAGE_COLUMN]:
        raise bad_request(f"expected one column named '{IMAGE_COLUMN}' (image files as base64), got columns "
                          f"{columns}")
    return list(np.ravel(np.asarray(data[IMAGE_COLUMN], dtype=object)))


def tensors(data, input_shape: tuple[int, ...]) -> np.ndarray:
    """Standardised pixels (N, *input_shape) as float32; single-channel images may come without their channel
    axis, (N, h, w): MLflow's JSON parser copies every nested list once more, and a channel axis of 1 makes a list
    per pixel."""
    x = np.asarray(data)
    if x.dtype.kind in "iu":
        x = x.astype(np.float32)
    if x.dtype.kind != "f":
        raise bad_request(f"expected standardised pixels (numbers) or a column '{IMAGE_COLUMN}' of image files, "
                          f"got {x.dtype} data")
    if input_shape[-1] == 1 and x.shape[1:] == input_shape[:-1]:
        x = x[..., None]
    if x.ndim != len(input_shape) + 1 or x.shape[1:] != input_shape or len(x) == 0:
        shape = ", ".join(map(str, input_shape))
        raise bad_request(f"expected standardised pixels of shape (N, {shape}), got shape {x.shape}")
    return x.astype(np.float32, copy=False)


class ServedModel:
    """A Keras model and its training data's settings as a pyfunc implementation (``predict``,
    ``get_raw_model``).

    Args:
        model: the Keras model: (N, *input_shape) standardised pixels -> (N, classes) probabilities.
        data: the data settings logged with it (``input_shape``, ``mean``, ``std``, ``class_names``).
    """

    def __init__(self, model: keras.Model, data: dict):
        self.model = model
        self.input_shape = tuple(int(n) for n in data["input_shape"])
        self.mean, self.std = data["mean"], data["std"]
        self.class_names = [str(name) for name in data["class_names"]]
        # One traced graph for every batch size: a direct call runs layer by layer in Python, Model.predict
        # builds an input pipeline per call.
        self.forward = tf.function(lambda x: model(x, training=False),
                                   input_signature=[tf.TensorSpec((None, *self.input_shape), tf.float32)])
        self.forward.get_concrete_function()

    def get_raw_model(self) -> keras.Model:
        return self.model

    def predict(self, data, params=None):
        """Probabilities (N, classes) for tensors; for image files a DataFrame, one row per image: ``class``,
        ``probability`` and ``top3`` (a list of ``{"class", "probability"}``, best first)."""
        files = image_column(data)
        if files is None:
            return self.probabilities(tensors(data, self.input_shape))
        return self.answers(files)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return self.forward(tf.constant(x)).numpy()

    def answers(self, files: list) -> pd.DataFrame:
        """Each file read, prepared as predict.py prepares it, and classified; every bad file reported at once."""
        if not files:
            raise bad_request("no images in the request")
        pixels, problems = [], []
        for index, value in enumerate(files):
            source = f"image {index}"
            try:
                rgb = read_image(io.BytesIO(file_bytes(value, source)), source, MAX_PIXELS)
                pixels.append(prepare(rgb, self.input_shape, source))
            except ImageError as e:
                problems.append(str(e))
        if problems:
            raise bad_request("; ".join(problems))
        p = self.probabilities(normalise(np.stack(pixels), self.mean, self.std))
        rows = []
        for probabilities in p:
            top = [{"class": self.class_names[k], "probability": float(probabilities[k])}
                   for k in np.argsort(-probabilities, kind="stable")[:TOP]]
            rows.append({"class": top[0]["class"], "probability": top[0]["probability"], "top3": top})
        return pd.DataFrame(rows, columns=["class", "probability", "top3"])


def _load_pyfunc(path: str) -> ServedModel:
    """The loader_module contract: the pyfunc implementation of the model folder ``path``.

    Loaded by a scoring server, what is alive then (TensorFlow, Keras, MLflow, the model: hundreds of thousands of
    objects) is frozen out of Python's garbage collector (``gc.freeze``), as every command of the lab does after
    its start-up: the full collections that each request's JSON parsing sets off (a list per pixel row) would
    otherwise walk all of it again, more than doubling the time per request."""
    served = ServedModel(mlflow.keras.load_model(path), Model.load(path).metadata[METADATA_KEY])
    if SCORING_APP in sys.modules:
        gc.freeze()
    return served
