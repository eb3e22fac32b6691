"""Gradient checks: a layer against a reference twin, plus float64 central differences.

For a student's own layer::

    from models.gradcheck import check_layer
    print(check_layer(MyConv(4, 3), reference=keras.layers.Conv2D(4, 3), input_shape=(2, 9, 9, 3)))

For a configured model (its scratch layers against the builtin twins, on one real batch)::

    python -m models.gradcheck model=lenet_scratch [data=fashion_mnist] [batch_size=32]

exits 1 when a check is beyond tolerance. The table has one row per compared quantity: a layer's
output, its input gradient and each weight's gradient under a random upstream gradient (float32,
``|a − e| <= 1e-5 + 1e-4·max|e|`` everywhere), then float64 central differences on a few entries of each
weight, or of the input of a layer without weights (relative error ``max|a − n| / max(|a| + |n|) <= 1e-6``).
Layers that compute differently in training (batch normalization, dropout) are checked in both modes,
the rows of training mode marked "(training)", and so is the model's loss; the twins then share the
state of their draws and statistics, and every layer's state is put back afterwards.

The command composes the config with Hydra from ``conf/`` and reads the dataset's images itself
(``models/`` does not import ``experiments/``): the first images of the training file, scaled as
``data.mean`` / ``data.std`` say.
"""

import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from models.layers import ScratchSparseCategoricalCrossentropy

ATOL, RTOL = 1e-5, 1e-4  # float32 twins
FD_TOL = 1e-6  # float64 central differences
FD_STEP = 1e-6
# Entries per tensor checked by central differences: for one layer, and per layer of a model (which a
# training run checks before it fits: benchmarks/gradcheck_cost.py).
FD_ENTRIES = {"input and weights": 3, "weights": 1}
FD_BATCH = 1
FD_TRAINING_BATCH = 4  # training mode: batch statistics need more than one sample


@dataclass
class Row:
    layer: str
    quantity: str
    shape: tuple
    max_abs_error: float
    max_rel_error: float
    passed: bool
    note: str = ""


@dataclass
class GradcheckTable:
    rows: list[Row]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def max_rel_error(self) -> float:
        return max((row.max_rel_error for row in self.rows), default=0.0)

    def markdown(self) -> str:
        lines = ["| layer | quantity | shape | max abs error | max rel error | result |",
                 "|---|---|---|---:|---:|---|"]
        for r in self.rows:
            result = ("ok" if r.passed else "**FAILED**") + (f" ({r.note})" if r.note else "")
            lines.append(f"| {r.layer} | {r.quantity} | {r.shape} | {r.max_abs_error:.2e} | "
                         f"{r.max_rel_error:.2e} | {result} |")
        verdict = "passed" if self.passed else "FAILED"
        return "\n".join([*lines, "", f"gradient check {verdict}: max relative error {self.max_rel_error:.2e}"])

    __str__ = markdown

    def __add__(self, other: "GradcheckTable") -> "GradcheckTable":
        return GradcheckTable(self.rows + other.rows)


def relative_error(a, e) -> float:
    """``max|a − e| / max(|a| + |e|)``: the error against the tensor's own scale."""
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    return float(np.max(np.abs(a - e)) / max(np.max(np.abs(a) + np.abs(e)), 1e-30)) if a.size else 0.0


def compare(layer, quantity, actual, expected) -> Row:
    """A float32 twin comparison: passes where ``|a − e| <= ATOL + RTOL·max|e|`` everywhere. The
    tolerance scales with the tensor's largest entry, not each entry's own size: a bias gradient sums
    ~10⁵ upstream values, and float32 rounding of such a sum is relative to the terms' magnitude, so
    an entry that sums to nearly 0 carries the same absolute error as its large neighbours."""
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape:
        return Row(layer, quantity, a.shape, np.inf, np.inf, False, f"shape {a.shape}, expected {e.shape}")
    max_abs = float(np.max(np.abs(a - e))) if a.size else 0.0
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    return Row(layer, quantity, a.shape, max_abs, relative_error(a, e), max_abs <= ATOL + RTOL * scale)


def takes_training(layer) -> bool:
    """Whether ``layer`` computes differently in training: its ``call`` takes ``training`` (batch
    normalization, dropout), which Keras then passes."""
    return "training" in inspect.signature(layer.call).parameters


def state(layer) -> list[np.ndarray]:
    """The values of ``layer``'s non-trainable variables: moving statistics, random-draw counters."""
    return [v.numpy() for v in layer.non_trainable_variables]


def set_state(layer, values) -> None:
    for variable, value in zip(layer.non_trainable_variables, values, strict=True):
        variable.assign(value)


def outputs_and_grads(layer, x, g, training=False):
    """``[y, dL/dx, dL/dw for each trainable weight]`` for ``L = Σ layer(x, training) · g``."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
    return [y, *tape.gradient(y, [x, *layer.trainable_weights], output_gradients=g)]


def central_differences(layer, x, rng, mode="input and weights", training=False) -> list[Row]:
    """Analytic float64 gradients of a float64 copy of ``layer`` against central differences of
    ``L = Σ layer(x, training) · g`` on ``FD_ENTRIES[mode]`` random entries of each weight and (``mode``
    "input and weights", or for a layer without weights) of the input, at a random input. An entry where
    the one-sided slopes disagree (a ReLU or max-pool kink within the step) is skipped. Every evaluation
    starts from the copy's same state (in training: the same dropout draws, whatever the moving
    statistics became)."""
    twin = type(layer).from_config({**layer.get_config(), "dtype": "float64"})
    x = tf.Variable(rng.normal(size=(FD_TRAINING_BATCH if training else FD_BATCH, *x.shape[1:])))
    g = tf.constant(rng.normal(size=twin(x).shape))  # the call builds the twin
    twin.set_weights([w.astype(np.float64) for w in layer.get_weights()])
    start = state(twin)

    def evaluate():
        set_state(twin, start)
        return tf.reduce_sum(twin(tf.convert_to_tensor(x), training=training) * g)

    def loss():
        return float(evaluate())

    params, names = twin.trainable_weights, [w.name for w in layer.trainable_weights]
    entries = FD_ENTRIES[mode]
    if mode == "input and weights" or not params:
        params, names = [x, *params], ["input", *names]
    with tf.GradientTape() as tape:
        value = evaluate()
    analytic = tape.gradient(value, params)
    rows = []
    for param, grad, name in zip(params, analytic, names, strict=True):
        base, checked, a, n = param.numpy(), 0, [], []
        centre = float(value)
        for flat in rng.choice(base.size, min(entries, base.size), replace=False):
            slopes = []
            for sign in (1, -1):
                shifted = base.copy()
                shifted.flat[flat] += sign * FD_STEP
                param.assign(shifted)
                slopes.append(sign * loss())
            param.assign(base)
            right, left = (slopes[0] - centre) / FD_STEP, (centre + slopes[1]) / FD_STEP
            if abs(right - left) > 1e-3 * (abs(right) + abs(left)) + 1e-9:
                continue  # a kink within the step: the derivative there is a convention, not a limit
            checked += 1
            a.append(grad.numpy().flat[flat])
            n.append((right + left) / 2)
        error = relative_error(a, n)
        rows.append(Row(layer.name, f"{name} gradient, float64 central differences{_mode(training)}", base.shape,
                        float(np.max(np.abs(np.subtract(a, n)))) if a else 0.0, error, error <= FD_TOL,
                        f"{checked} entr{'y' if checked == 1 else 'ies'}"
                        + ("" if checked == min(entries, base.size) else ", rest at kinks")))
    return rows


def _mode(training) -> str:
    return " (training)" if training else ""


def check_layer(layer, reference=None, input_shape=None, x=None, seed=0, finite_differences="input and weights",
                training=False) -> GradcheckTable:
    """Check ``layer``'s forward and backward pass; returns the table (``print`` it).

    Args:
        layer: the Keras layer under test (unbuilt, or built for this input).
        reference: a layer that computes the same function (e.g. the ``keras.layers`` twin); its
            weights are copied into ``layer``, then outputs and gradients of input and weights are
            compared under a random upstream gradient. ``None``: central differences only.
        input_shape: shape of the random input (batch included), when ``x`` is not given.
        x: the input itself (e.g. a real batch).
        seed: seed of the random input, upstream gradient and checked entries.
        finite_differences: float64 central differences on a few entries of ``"input and weights"``,
            of the ``"weights"`` only (the input too for a layer without weights), or ``None``.
        training: the mode the layers are called in. In training ``layer`` starts from the
            reference's state (its dropout draws; its moving statistics are already copied as weights).
            Both layers' states are put back afterwards.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.normal(size=input_shape) if x is None else x, np.float32)
    rows = []
    if not layer.built:
        layer(x)
    if reference is not None:
        y = reference(x)  # builds it too
        layer.set_weights(reference.get_weights())
        states = state(layer), state(reference)
        if training:
            set_state(layer, states[1])
        g = tf.constant(rng.normal(size=y.shape), y.dtype)
        expected = outputs_and_grads(reference, x, g, training)
        actual = outputs_and_grads(layer, x, g, training)
        set_state(layer, states[0]), set_state(reference, states[1])
        names = ["output", "input gradient", *(f"{w.name} gradient" for w in layer.trainable_weights)]
        rows += [compare(layer.name, name + _mode(training), a, e)
                 for name, a, e in zip(names, actual, expected, strict=False)]
        if len(actual) != len(expected):
            rows.append(Row(layer.name, "weights", (), np.inf, np.inf, False,
                            f"{len(actual) - 2} trainable weights, the reference has {len(expected) - 2}"))
    if finite_differences:
        rows += central_differences(layer, x, rng, finite_differences, training)
    return GradcheckTable(rows)


def check_model(scratch: keras.Model, builtin: keras.Model, x, y, seed=0) -> GradcheckTable:
    """Each layer of ``scratch`` against the same layer of its ``builtin`` twin (which takes the scratch
    model's weights), fed the twin's activations of the batch ``x``; then the whole model: the scratch
    loss and every weight's gradient of it against Keras's loss on the builtin twin, labels ``y``.
    Layers that compute differently in training, and then the model, are checked in both modes; the
    models' states (moving statistics, random draws) are as they were afterwards."""
    builtin.set_weights(scratch.get_weights())
    table, h = GradcheckTable([]), np.asarray(x, np.float32)
    for mine, twin in zip(scratch.layers, builtin.layers, strict=True):
        for training in (False, True) if takes_training(mine) else (False,):
            table += check_layer(mine, reference=twin, x=h, seed=seed, finite_differences="weights",
                                 training=training)
        h = twin(h).numpy()
    for training in (False, True) if any(map(takes_training, scratch.layers)) else (False,):
        table += check_loss(scratch, builtin, x, y, training)
    return table


def check_loss(scratch: keras.Model, builtin: keras.Model, x, y, training=False) -> GradcheckTable:
    """The scratch loss and every weight's gradient of it against Keras's loss on the builtin twin (in
    training from the twin's state: the same dropout draws); both models' states put back."""
    states = state(scratch), state(builtin)
    if training:
        set_state(scratch, states[1])
    losses = []
    for model, loss_fn in ((scratch, ScratchSparseCategoricalCrossentropy()),
                           (builtin, keras.losses.SparseCategoricalCrossentropy())):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=training))
        losses.append([loss, *tape.gradient(loss, model.trainable_weights)])
    set_state(scratch, states[0]), set_state(builtin, states[1])
    (loss, *grads), (loss_k, *grads_k) = losses
    rows = [compare("model", "loss" + _mode(training), loss, loss_k)]
    rows += [compare("model", f"{w.path} gradient of the loss{_mode(training)}", a, e)
             for w, a, e in zip(scratch.trainable_weights, grads, grads_k, strict=True)]
    return GradcheckTable(rows)


# --------------------------------------------------------------------------- command line


def real_batch(data_cfg, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``size`` training images of the configured dataset, NHWC float32 scaled as
    ``(x / 255 − mean) / std``, and their labels."""
    if data_cfg.source == "npz":
        path = Path(data_cfg.path)
        with np.load(path if path.is_absolute() else Path(__file__).resolve().parents[1] / path) as f:
            x, y = f["x_train"][:size], f["y_train"][:size]
    else:
        (x, y), _ = getattr(keras.datasets, data_cfg.name).load_data()
        x, y = x[:size], y[:size]
    x = x.reshape(len(x), *data_cfg.input_shape).astype(np.float32) / 255
    return (x - np.float32(data_cfg.mean)) / np.float32(data_cfg.std), y.reshape(-1).astype(np.int64)


def main(argv: list[str]) -> int:
    """``python -m models.gradcheck model=<config> [data=<config>] [batch_size=N] [seed=N]``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from models.architectures import build_model

    options = dict(arg.split("=", 1) for arg in argv if arg.split("=", 1)[0] in ("batch_size", "seed"))
    overrides = [arg for arg in argv if arg.split("=", 1)[0] not in options]
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides)
    seed = int(options.get("seed", cfg.seed))
    x, y = real_batch(cfg.data, int(options.get("batch_size", 16)))
    models = {}
    for kind in ("scratch", "builtin"):
        model_cfg = cfg.model.copy()
        with open_dict(model_cfg):
            model_cfg.layers = kind
        keras.utils.set_random_seed(seed)
        models[kind] = build_model(model_cfg, x.shape[1:], len(cfg.data.class_names))
    table = check_model(models["scratch"], models["builtin"], x, y, seed)
    print(f"{cfg.model.name}: scratch layers against the builtin twin on {len(x)} {cfg.data.name} training "
          f"images\n\n{table}")
    return 0 if table.passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
