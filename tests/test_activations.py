"""The scratch activations and the fused softmax cross-entropy of ``models.ops`` / ``models.layers``
against Keras's: forward and backward under random upstream gradients (float32, ``atol=1e-5,
rtol=1e-4``), float64 central differences, extreme logits (±80), ReLU's tie at 0, the seeds'
printed numbers, and graphs of whole training steps with no autodiff of an activation or the loss.
"""


import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import ops  # noqa: E402
from models.architectures import build_model  # noqa: E402
from models.layers import ScratchActivation, ScratchSparseCategoricalCrossentropy  # noqa: E402
from tests.conftest import compose_train  # noqa: E402
from tests.graph_ops import AUTODIFF_OPS, graph_nodes  # noqa: E402

TOL = {"atol": 1e-5, "rtol": 1e-4}
DEC8 = {"atol": 1e-7, "rtol": 1e-7}  # numpy's printed 8 decimals
NAMES = ["relu", "sigmoid", "tanh", "softmax"]


def value_and_grad(fn, x, g):
    """``fn(x)`` and ``d Σ fn(x)·g / dx``."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return y, tape.gradient(y, x, output_gradients=g)


def inputs(kind, shape=(6, 10), dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return (3 * rng.normal(size=shape)).astype(dtype)
    if kind == "extreme":  # ±80 and everything between: exp overflows float32 beyond ~88
        return rng.choice([-80.0, -40.0, -1.0, 0.0, 1.0, 40.0, 80.0], size=shape).astype(dtype)
    return np.round(rng.normal(size=shape)).astype(dtype)  # "ties": many exact zeros


# --------------------------------------------------------------------------- activations vs Keras


@pytest.mark.parametrize("kind", ["normal", "extreme", "ties"])
@pytest.mark.parametrize("name", NAMES)
def test_activation_matches_keras(name, kind):
    x = inputs(kind)
    g = tf.constant(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    y, dx = value_and_grad(ops.ACTIVATIONS[name], x, g)
    y_k, dx_k = value_and_grad(keras.activations.get(name), x, g)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(y, y_k, **TOL)
    np.testing.assert_allclose(dx, dx_k, **TOL)


def test_relu_slope_at_zero_is_zero_like_tensorflow():
    x = tf.constant([-1.0, 0.0, -0.0, 2.0])
    _, dx = value_and_grad(ops.relu, x, tf.ones(4))
    np.testing.assert_array_equal(dx, [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(dx, value_and_grad(tf.nn.relu, x, tf.ones(4))[1])


def test_softmax_rows_sum_to_one_for_huge_logits():
    p = ops.softmax(tf.constant([[1000.0, 0.0, -1000.0], [80.0, 80.0, 80.0]]))
    np.testing.assert_allclose(p, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], **TOL)


def numeric_gradient(f, x, g, h=1e-6):
    """Central differences of ``Σ f(x)·g`` in float64."""
    numeric = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        for sign in (1, -1):
            shifted = x.copy()
            shifted[idx] += sign * h
            numeric[idx] += sign * float(tf.reduce_sum(f(tf.constant(shifted)) * g)) / (2 * h)
    return numeric


def relative_error(a, n):
    return np.max(np.abs(a - n)) / max(np.max(np.abs(a) + np.abs(n)), 1e-30)


@pytest.mark.parametrize("name", NAMES)
def test_activation_float64_central_differences(name):
    x = inputs("normal", (3, 5), np.float64, seed=2)
    x[np.abs(x) < 1e-3] = 0.5  # relu has no derivative at 0
    g = np.random.default_rng(3).normal(size=x.shape)
    _, dx = value_and_grad(ops.ACTIVATIONS[name], x, tf.constant(g))
    assert dx.dtype == tf.float64
    assert relative_error(dx.numpy(), numeric_gradient(ops.ACTIVATIONS[name], x, g)) < 1e-7


@pytest.mark.parametrize("name", NAMES)
def test_activation_layer_matches_keras_layer(name):
    x = inputs("normal", (2, 4, 5, 3))
    g = tf.constant(np.random.default_rng(4).normal(size=x.shape).astype(np.float32))
    layer = ScratchActivation(name)
    assert ScratchActivation.from_config(layer.get_config()).get_config() == layer.get_config()
    assert layer.get_config()["activation"] == keras.layers.Activation(name).get_config()["activation"]
    for a, e in zip(value_and_grad(layer, x, g), value_and_grad(keras.layers.Activation(name), x, g), strict=True):
        np.testing.assert_allclose(a, e, **TOL)


# --------------------------------------------------------------------------- loss vs Keras


def loss_and_grad(loss_fn, labels, logits):
    logits = tf.convert_to_tensor(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = loss_fn(labels, logits)
    return loss, tape.gradient(loss, logits)


def keras_mean_loss(labels, logits):
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))


@pytest.mark.parametrize("kind", ["normal", "extreme"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_loss_matches_keras(kind, dtype):
    logits = inputs(kind, (7, 10), dtype, seed=5)
    labels = tf.constant(np.random.default_rng(6).integers(0, 10, 7))
    loss, dz = loss_and_grad(ops.sparse_softmax_cross_entropy, labels, logits)
    loss_k, dz_k = loss_and_grad(keras_mean_loss, labels, logits)
    assert np.isfinite(loss) and np.all(np.isfinite(dz))
    np.testing.assert_allclose(loss, loss_k, **TOL)
    np.testing.assert_allclose(dz, dz_k, **TOL)
    p = ops.softmax_forward(logits).numpy()
    np.testing.assert_allclose(dz, (p - np.eye(10)[labels.numpy()]) / 7, **TOL)  # (p − y) / N


def test_fused_loss_float64_central_differences():
    logits = inputs("normal", (4, 5), np.float64, seed=7)
    labels = tf.constant([0, 4, 2, 2])
    _, dz = loss_and_grad(ops.sparse_softmax_cross_entropy, labels, logits)
    numeric = numeric_gradient(lambda z: ops.sparse_softmax_cross_entropy(labels, z), logits, 1.0)
    assert relative_error(dz.numpy(), numeric) < 1e-7


@pytest.mark.parametrize("kind", ["normal", "extreme"])
def test_loss_object_on_softmax_outputs_matches_keras(kind):
    """As in a model: softmax probabilities into the loss object; gradients at the logits."""
    logits = inputs(kind, (5, 10), seed=8)
    labels = tf.constant([[1], [9], [0], [3], [3]])  # Keras passes (N, 1) labels too
    scratch = ScratchSparseCategoricalCrossentropy()
    builtin = keras.losses.SparseCategoricalCrossentropy()
    loss, dz = loss_and_grad(lambda y, z: scratch(y, ops.softmax(z)), labels, logits)
    loss_k, dz_k = loss_and_grad(lambda y, z: builtin(y, keras.activations.softmax(z)), labels, logits)
    np.testing.assert_allclose(loss, loss_k, **TOL)
    np.testing.assert_allclose(dz, dz_k, **TOL)


def test_loss_object_on_bare_probabilities_matches_keras():
    """Probabilities that lost their logits (a cast) are taken as log(clip(p)), as Keras does."""
    p = tf.constant(ops.softmax_forward(inputs("normal", (5, 10), seed=9)).numpy())
    labels = tf.constant([1, 9, 0, 3, 3])
    loss, dp = loss_and_grad(ScratchSparseCategoricalCrossentropy(), labels, p)
    loss_k, dp_k = loss_and_grad(keras.losses.SparseCategoricalCrossentropy(), labels, p)
    np.testing.assert_allclose(loss, loss_k, **TOL)
    np.testing.assert_allclose(dp, dp_k, **TOL)


def test_loss_object_config_and_sample_weight():
    loss = ScratchSparseCategoricalCrossentropy(from_logits=True)
    assert ScratchSparseCategoricalCrossentropy.from_config(loss.get_config()).from_logits is True
    with pytest.raises(ValueError, match="sample_weight"):
        loss(tf.constant([0]), tf.constant([[1.0, 2.0]]), sample_weight=tf.constant([2.0]))


# --------------------------------------------------------------------------- the seeds' numbers


def test_seed000_sigmoid_forward_and_delta():
    """seed 000: sigmoid of the pooled map, and the "sigmoid delta" δ·s(1−s) for the FC layer's
    "delta input" (both as printed, 8 decimals)."""
    pooled = tf.constant([[0.3092, 0.2652], [0.612, 0.1892]], tf.float64)
    delta = tf.constant([[0.1495, 0.28], [0.2055, -0.2755]], tf.float64)
    s, ds = value_and_grad(ops.sigmoid, pooled, delta)
    np.testing.assert_allclose(s, [[0.57668998, 0.56591413], [0.64839689, 0.5471594]], **DEC8)
    np.testing.assert_allclose(ds, [[0.03649574, 0.06878349], [0.04684955, -0.06826229]], **DEC8)


# seed 002, cells 108–152: exp(z) of ten class outputs, their softmax, the log loss for label 0.
EXP_002 = [1.42381039, 1.50550042, 0.7959589, 1.42367109, 1.1974323,
           0.25044895, 0.6063678, 0.55110446, 1.06548563, 1.17410945]
SOFTMAX_002 = [0.1424681, 0.15064209, 0.07964456, 0.14245416, 0.11981645,
               0.02506021, 0.06067386, 0.05514414, 0.10661371, 0.11748273]
DSOFTMAX0_002 = [0.12217094, -0.02146169, -0.01134681, -0.02029517, -0.01707002,  # ∂σ_0/∂z
                 -0.00357028, -0.00864409, -0.00785628, -0.01518905, -0.01673754]


def test_seed002_softmax_and_cross_entropy():
    z = tf.constant(np.log(EXP_002)[None])  # the printed exp(z), back to z
    p, dp0 = value_and_grad(ops.softmax, z, tf.constant(np.eye(10)[:1]))  # row 0 of the Jacobian
    np.testing.assert_allclose(p[0], SOFTMAX_002, **DEC8)
    np.testing.assert_allclose(dp0[0], DSOFTMAX0_002, **DEC8)
    loss, dz = loss_and_grad(ops.sparse_softmax_cross_entropy, tf.constant([0]), z)
    np.testing.assert_allclose(loss, 1.9486371983952187, atol=1e-7)  # the seed's float64 repr
    # dL/dp_0 = −1/p_0 = −7.0191154 (printed "gradients"), times ∂σ_0/∂z: p − y.
    np.testing.assert_allclose(dz[0], -7.0191154 * np.asarray(DSOFTMAX0_002), **DEC8)
    np.testing.assert_allclose(dz[0], np.asarray(SOFTMAX_002) - np.eye(10)[0], **DEC8)


# --------------------------------------------------------------------------- whole training steps


def training_step_ops(model_name):
    """Op types of one training step of the configured model as ``train.py`` compiles it: forward,
    the compiled loss, gradients (function libraries included)."""
    from experiments.run.scratch_run import training_loss

    cfg = compose_train([f"model={model_name}"])
    model = build_model(cfg.model, cfg.data.input_shape, len(cfg.data.class_names))
    model.compile(optimizer="sgd", loss=training_loss(cfg.model))
    x = tf.constant(inputs("normal", (4, *cfg.data.input_shape), seed=10))
    y = tf.constant([[1], [2], [3], [4]])

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=True), training=True)
        return tape.gradient(loss, model.trainable_weights)

    return {node.op for node in graph_nodes(step.get_concrete_function(x, y).graph)}


@pytest.mark.parametrize("name", ["lenet", "lenet5_classic"])  # relu + softmax; tanh + softmax
def test_scratch_training_step_has_no_autodiff_of_activations_or_loss(name):
    scratch_ops = training_step_ops(f"{name}_scratch")
    assert "IdentityN" in scratch_ops  # the custom gradients are in the graph
    assert not scratch_ops & AUTODIFF_OPS
    assert "ClipByValue" not in scratch_ops  # the loss got the logits, not its log(clip(p)) fallback
    # The check can fail: the builtin twin's step does trip it.
    assert training_step_ops(name) & AUTODIFF_OPS
