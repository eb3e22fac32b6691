"""Dataset loading: the bundled MNIST copy (checksummed) and the keras.datasets downloads.

Every loader returns NHWC float32 images and integer labels, split into train / validation / test.
The validation images are held out from the training set; the test set is only used for the final
evaluation.
"""

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from experiments import PROJECT_ROOT
from experiments.errors import UserError


@dataclass
class Dataset:
    x_train: np.ndarray  # (N, H, W, C) float32
    y_train: np.ndarray  # (N,) int64
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_npz(path: str | os.PathLike, sha256: str):
    """Load a Keras-style ``.npz`` (keys x_train y_train x_test y_test) after verifying its checksum."""
    path = Path(path)
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    if not path.is_file():
        raise UserError(f"Dataset file not found: {path} (expected sha256 {sha256}).")
    actual = sha256_of(path)
    if actual != sha256:
        raise UserError(
            f"Dataset file {path} is corrupt: expected sha256 {sha256}, got {actual}. "
            "Restore it with `git checkout -- data/`."
        )
    with np.load(path) as f:
        return (f["x_train"], f["y_train"]), (f["x_test"], f["y_test"])


def load_keras_dataset(name: str):
    """Load ``keras.datasets.<name>``: downloaded into ~/.keras/datasets on first use, cached after."""
    import keras

    module = getattr(keras.datasets, name)
    try:
        return module.load_data()
    except Exception as e:  # urllib, ssl and keras's own "URL fetch failure" errors all land here
        cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"
        raise UserError(
            f"Dataset '{name}' is not cached in {cache} and could not be downloaded "
            f"({type(e).__name__}: {e}); connect to the internet once, or use data=mnist, which ships "
            "with the project."
        ) from None


def to_nhwc_float(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (N, H, W[, C]) -> float32 (N, H, W, C), scaled to [0, 1] then standardised per channel:
    ``(v / 255 - mean_c) / std_c``, computed in float32 for the 256 levels of each channel and looked up. The
    same values as computing it for every pixel, in one pass with no float temporaries: MNIST's 70,000 images
    take ~0.2 CPU-s instead of ~1 and half the peak memory."""
    if images.ndim == 3:
        images = images[..., None]
    levels = np.arange(256, dtype=np.float32)[:, None] / 255.0  # (256, 1)
    table = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (256, C)
    return table[images, np.arange(images.shape[-1])]


def check_class_names(cfg, num_classes: int) -> None:
    """One name per class of the dataset (labels 0 to ``num_classes`` - 1): the model gets one output per name,
    and a label without its output stopped training with TensorFlow's InvalidArgumentError."""
    given = len(cfg.class_names)
    if given != num_classes:
        raise UserError(f"data.class_names has {given} names but the dataset {cfg.name} has {num_classes} classes "
                        f"(labels 0-{num_classes - 1}).")


def load_dataset(cfg) -> Dataset:
    """Build the train / validation / test split described by a ``data`` config group."""
    if cfg.source == "npz":
        (x_train, y_train), (x_test, y_test) = load_npz(cfg.path, cfg.sha256)
    else:
        (x_train, y_train), (x_test, y_test) = load_keras_dataset(cfg.name)
    y_train, y_test = y_train.reshape(-1).astype(np.int64), y_test.reshape(-1).astype(np.int64)
    shape = tuple(x_train.shape[1:]) + ((1,) if x_train.ndim == 3 else ())
    if shape != tuple(cfg.input_shape):
        raise UserError(f"data.input_shape is {list(cfg.input_shape)} but {cfg.name} images are {list(shape)}.")
    check_class_names(cfg, max(int(y_train.max(initial=0)), int(y_test.max(initial=0))) + 1)

    n = len(x_train)
    if not 0 < cfg.val_size < n:
        raise UserError(f"data.val_size must be between 1 and {n - 1} for {cfg.name}, got {cfg.val_size}.")
    n_fit = n - cfg.val_size
    train_size = n_fit if cfg.train_size is None else cfg.train_size
    if not 0 < train_size <= n_fit:
        raise UserError(
            f"data.train_size must be between 1 and {n_fit} (training images left after "
            f"data.val_size={cfg.val_size}), got {cfg.train_size}."
        )
    test_size = len(x_test) if cfg.test_size is None else cfg.test_size
    if not 0 < test_size <= len(x_test):
        raise UserError(f"data.test_size must be between 1 and {len(x_test)}, got {cfg.test_size}.")

    # The validation images are the last val_size of the training set, whatever train_size is,
    # so runs with different caps are selected on the same images.
    mean, std = cfg.mean, cfg.std
    return Dataset(
        x_train=to_nhwc_float(x_train[:train_size], mean, std),
        y_train=y_train[:train_size],
        x_val=to_nhwc_float(x_train[n_fit:], mean, std),
        y_val=y_train[n_fit:],
        x_test=to_nhwc_float(x_test[:test_size], mean, std),
        y_test=y_test[:test_size],
        class_names=list(cfg.class_names),
    )


def dataset_source(cfg) -> str:
    """Where the images come from: the bundled file, or the keras.datasets module."""
    if cfg.source == "npz":
        path = Path(cfg.path)
        return str(path if path.is_absolute() else PROJECT_ROOT / path)
    return f"keras.datasets.{cfg.name}"


def log_dataset_inputs(cfg, data: Dataset) -> None:
    """The training, validation and test splits as the active MLflow run's dataset inputs (name,
    digest, source): the runs list's Dataset column and the run page's Datasets section."""
    import mlflow

    source = dataset_source(cfg)
    splits = [("train", "training", data.x_train, data.y_train), ("validation", "validation", data.x_val, data.y_val),
              ("test", "test", data.x_test, data.y_test)]
    for split, context, x, y in splits:
        with warnings.catch_warnings():  # MLflow registers "" and "file" paths as two equal source types
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_numpy(x, targets=y, source=source, name=f"{cfg.name}-{split}")
        log_input(dataset, context)


def log_input(dataset, context: str) -> None:
    """``mlflow.log_input``, once more when a parallel job of the same sweep stored the same dataset in the
    experiment between the store's look-up and its insert (PostgreSQL: duplicate key "dataset_pk"; sqlite:
    UNIQUE constraint failed): the second call finds that dataset and links this run to it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as e:
        if not any(clash in str(e) for clash in ("duplicate key value", "UNIQUE constraint failed")):
            raise
        mlflow.log_input(dataset, context=context)


def shift_offsets(n: tf.Tensor, max_shift: int, seed: tf.Tensor) -> tf.Tensor:
    """Every image's (dy, dx) in [-max_shift, max_shift]^2, whole pixels, drawn from the stateless generator at
    ``seed`` (shape (2,) int): (N, 2) int32, offsets into the image padded by ``max_shift``."""
    return tf.random.stateless_uniform((n, 2), seed, 0, 2 * max_shift + 1, dtype=tf.int32)


def random_shift(images: tf.Tensor, max_shift: int, seed: tf.Tensor) -> tf.Tensor:
    """Translate every image by its own random (dy, dx) in [-max_shift, max_shift]^2, drawn from the
    stateless generator at ``seed`` (shape (2,) int): the same seed gives the same shifts.

    (N, H, W, C) -> (N, H, W, C): the batch is padded by mirroring its border (background for
    digits), then each image is cropped back at a random offset with one gather per axis.
    """
    s = max_shift
    n, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    padded = tf.pad(images, [[0, 0], [s, s], [s, s], [0, 0]], mode="SYMMETRIC")  # (N, H+2s, W+2s, C)
    offsets = shift_offsets(n, s, seed)
    rows = offsets[:, :1] + tf.range(h)[None]  # (N, H)
    cols = offsets[:, 1:] + tf.range(w)[None]  # (N, W)
    shifted = tf.gather(padded, rows, axis=1, batch_dims=1)  # (N, H, W+2s, C)
    return tf.gather(shifted, cols, axis=2, batch_dims=1)  # (N, H, W, C)


def random_affine(images: tf.Tensor, max_shift: int, max_rotation: float, max_scale: float,
                  seed: tf.Tensor) -> tf.Tensor:
    """Rotate every image about its centre by its own angle in [-max_rotation, max_rotation] degrees, scale it by a
    factor in [1 - max_scale, 1 + max_scale] and translate it by the whole pixels ``random_shift`` draws at ``seed``
    (the same shifts), in one bilinear resampling of the batch (TensorFlow's ImageProjectiveTransformV3); points
    that fall outside an image read its border mirrored, as ``random_shift`` pads.

    Output pixel p reads the input at c + A⁻¹(p - c) + t, where c is the image's centre, A = scale · R(angle) and
    t the shift (in (x, y) = (column, row) coordinates). (N, H, W, C) -> (N, H, W, C).
    """
    n, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    shift = tf.cast(shift_offsets(n, max_shift, seed) - max_shift, tf.float32)  # (N, 2): (dy, dx)
    unit = tf.random.stateless_uniform((n, 2), tf.random.experimental.stateless_fold_in(seed, 1), -1.0, 1.0)
    angle = unit[:, 0] * (max_rotation * np.pi / 180)
    scale = 1 + unit[:, 1] * max_scale
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale  # A⁻¹ = R(-angle) / scale = [[cos, sin], [-sin, cos]]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    tx = cx - cos * cx - sin * cy + shift[:, 1]
    ty = cy + sin * cx - cos * cy + shift[:, 0]
    zeros = tf.zeros_like(cos)
    transforms = tf.stack([cos, sin, tx, -sin, cos, ty, zeros, zeros], axis=1)  # (N, 8)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.constant([h, w]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")


@dataclass(frozen=True)
class Augmentation:
    """Random changes of the training images (each off at 0): shifts by whole pixels up to ``max_shift``,
    rotations up to ``max_rotation`` degrees either way, scaling by up to ``max_scale`` (0.1: 90 % to 110 %)."""

    max_shift: int = 0
    max_rotation: float = 0.0
    max_scale: float = 0.0

    @classmethod
    def of(cls, data_cfg) -> "Augmentation":
        """The ``data`` group's settings (0 for one a run logged before it existed)."""
        return cls(data_cfg.get("max_shift", 0), data_cfg.get("max_rotation", 0.0), data_cfg.get("max_scale", 0.0))

    def __call__(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """The batch changed by draws from ``seed`` (shape (2,) int): shifts alone by cropping, anything more by
        one resampling (``random_affine``)."""
        if self.max_rotation > 0 or self.max_scale > 0:
            return random_affine(images, self.max_shift, self.max_rotation, self.max_scale, seed)
        if self.max_shift > 0:
            return random_shift(images, self.max_shift, seed)
        return images


class TrainingBatches:
    """The training set as batches whose order and random changes (``Augmentation``) depend on (seed, epoch,
    batch) only, so a run resumed at any epoch sees exactly the batches the uninterrupted run would have seen.

    ``dataset`` yields one epoch per iteration (Keras starts a new iteration every epoch); the epoch
    it yields is ``epoch``, a variable the ``SetEpoch`` callback sets as each epoch begins.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                 augmentation: Augmentation = Augmentation()):
        self.x, self.y = tf.constant(x), tf.constant(y)
        self.batch_size, self.seed, self.augmentation = batch_size, seed, augmentation
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)

    def epoch_key(self) -> tf.Tensor:
        """The stateless RNG seed of the current epoch, shape (2,)."""
        return tf.stack([tf.constant(self.seed, tf.int64), self.epoch.read_value()])

    def order(self, key: tf.Tensor) -> tf.Tensor:
        """A permutation of the training indices drawn from ``key``."""
        return tf.argsort(tf.random.stateless_uniform([tf.shape(self.y)[0]], key))

    @tf.autograph.experimental.do_not_convert  # plain TensorFlow ops, no Python control flow on tensors
    def one_epoch(self, _) -> tf.data.Dataset:
        key = self.epoch_key()
        dataset = tf.data.Dataset.from_tensor_slices(self.order(key)).batch(self.batch_size).enumerate()

        @tf.autograph.experimental.do_not_convert
        def gather(step, indices):
            images, labels = tf.gather(self.x, indices), tf.gather(self.y, indices)
            return self.augmentation(images, tf.random.experimental.stateless_fold_in(key, step)), labels

        return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE)  # stateless: the same in any order

    @property
    def dataset(self) -> tf.data.Dataset:
        batches_per_epoch = -(-int(self.y.shape[0]) // self.batch_size)
        dataset = tf.data.Dataset.range(1).flat_map(self.one_epoch)
        # The epoch's length, which flat_map hides: Keras then sizes its progress bar and epoch loop.
        return dataset.apply(tf.data.experimental.assert_cardinality(batches_per_epoch)).prefetch(tf.data.AUTOTUNE)


def batches(x, y, batch_size: int) -> tf.data.Dataset:
    """In-memory arrays as a prefetched tf.data pipeline of batches, in order (evaluation)."""
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(tf.data.AUTOTUNE)
