"""The scratch layers of ``models.layers`` against their ``keras.layers`` twins.

* Equality: outputs and the gradients of input, kernel and bias under a random upstream
  gradient, over a grid of kernel sizes, strides, paddings, non-square inputs, channel and
  batch counts (float32, ``atol=1e-5, rtol=1e-4``). Max pooling includes ties, which must go
  to the first maximum of each window in row-major order, as TensorFlow does.
* Float64 central differences check every hand-written backward pass on its own.
* Both ways the conv and pool layers run (``path``): their pieces as TensorFlow ops (a few
  images) and compiled by XLA (batches that come again and again).
* Each fast path of ``models.fast`` computes its formula of ``models.ops`` (patches equal, sums
  equal up to the order of their terms), both ways.
* Keras conventions: configs, weights, symbolic shapes, ``.keras`` files, argument errors,
  ``tf.function`` / XLA, mixed precision, MirroredStrategy (in a subprocess).
* The scratch graphs contain none of TensorFlow's conv / pool kernels or their gradients.
"""

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import fast, ops  # noqa: E402
from models.gradcheck import outputs_and_grads, set_state, state  # noqa: E402
from models.layers import (  # noqa: E402
    ScratchAvgPool2D,
    ScratchConv2D,
    ScratchDense,
    ScratchFlatten,
    ScratchMaxPool2D,
)
from tests.graph_ops import conv_pool_ops, graph_nodes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = {"atol": 1e-5, "rtol": 1e-4}


# --------------------------------------------------------------------------- helpers


def assert_twins(scratch, builtin, x, seed=0):
    """Same random weights in both layers, then equal outputs and gradients for a random ``g``."""
    rng = np.random.default_rng(seed)
    builtin(x), scratch(x)  # build
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in builtin.get_weights()]
    builtin.set_weights(weights)
    scratch.set_weights(weights)
    y = builtin(x)
    g = tf.constant(rng.normal(size=y.shape), y.dtype)
    expected = outputs_and_grads(builtin, x, g)
    actual = outputs_and_grads(scratch, x, g)
    assert len(actual) == len(expected) == 2 + len(weights)
    for name, a, e in zip(["y", "dx", "dkernel", "dbias"], actual, expected, strict=False):
        assert a.shape == e.shape, name
        np.testing.assert_allclose(a, e, **TOL, err_msg=name)


def random_input(shape, seed, ties=False):
    x = np.random.default_rng(seed).normal(size=shape)
    return (np.round(x) if ties else x).astype(np.float32)


@pytest.fixture(params=["ops", "compiled"])
def path(request, monkeypatch):
    """The conv and pool layers' pieces as TensorFlow ops, or compiled by XLA, whatever the batch size."""
    monkeypatch.setattr(fast, "COMPILE_FROM_BATCH", 10**9 if request.param == "ops" else 1)
    return request.param


def traced_nodes(layer, shape):
    """The nodes of ``layer``'s traced forward and backward pass, those of the functions it calls included."""
    x = tf.constant(random_input(shape, seed=12))
    step = tf.function(lambda x: outputs_and_grads(layer, x, tf.ones(layer.compute_output_shape(shape))))
    return graph_nodes(step.get_concrete_function(x).graph)


def compiled_calls(layer, shape):
    """How many XLA-compiled functions the traced forward and backward pass of ``layer`` calls."""
    return sum(node.attr["_XlaMustCompile"].b for node in traced_nodes(layer, shape) if "_XlaMustCompile" in node.attr)


@pytest.mark.parametrize(("batch", "expected"), [(None, True), (fast.COMPILE_FROM_BATCH, True),
                                                 (fast.COMPILE_FROM_BATCH - 1, False), (1, False)])
def test_batches_that_come_again_and_again_are_compiled_a_few_images_are_not(batch, expected):
    assert fast.worth_compiling(tf.TensorSpec((batch, 8, 8, 3))) is expected


@pytest.mark.parametrize(("make", "pieces"), [
    (lambda: ScratchConv2D(4, 3, activation="relu"), 4),  # im2col, bias + ReLU; their gradients, col2im
    (lambda: ScratchMaxPool2D(2), 2),
    (lambda: ScratchAvgPool2D(2), 2),
])
def test_the_compiled_path_compiles_each_piece_and_the_other_none(make, pieces, path):
    calls = compiled_calls(make(), (2, 8, 8, 3))
    assert calls == (pieces if path == "compiled" else 0)


# --------------------------------------------------------------------------- models.fast computes models.ops

FORMULA_CASES = [
    # (window, strides, padding, (h, w), channels, batch)
    ((3, 3), (1, 1), "valid", (7, 9), 2, 2),
    ((2, 3), (2, 1), "same", (7, 9), 3, 2),
    ((1, 1), (3, 2), "same", (10, 7), 2, 1),  # window smaller than the stride: phases no offset reaches
    ((5, 2), (2, 3), "valid", (9, 8), 4, 2),
    ((4, 4), (3, 3), "same", (11, 13), 1, 3),
]
SAME_SUM = {"atol": 1e-5, "rtol": 1e-6}  # the same terms, added in another order


def formula_case(window, strides, padding, hw, channels, batch, seed=0):
    """A random input with ties ``(batch, *hw, channels)``, its pads, and ``normal(shape)``: random tensors."""
    rng = np.random.default_rng(seed)
    x = tf.constant(np.round(2 * rng.normal(size=(batch, *hw, channels))).astype(np.float32))

    def normal(shape):
        return tf.constant(rng.normal(size=shape).astype(np.float32))

    return x, ops.window_pads(*hw, window, strides, padding), normal


@pytest.mark.parametrize("window, strides, padding, hw, channels, batch", FORMULA_CASES)
def test_fast_window_patches_and_scatter_are_those_of_ops(window, strides, padding, hw, channels, batch):
    x, pads, normal = formula_case(window, strides, padding, hw, channels, batch)
    for pad_value in (float("-inf"), 0.0):
        expected = ops.window_patches(x, window, strides, pads, pad_value)
        actual = fast.window_patches(x, window, strides, pads, pad_value)
        assert len(actual) == len(expected) == window[0] * window[1]
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_array_equal(a, e)
    stacked = fast.stacked_window_patches(x, window, strides, pads)  # padded with 0, as the last ones
    np.testing.assert_array_equal(tf.reshape(stacked, [-1, *stacked.shape[2:]]), tf.stack(expected))
    dpatches = [normal(expected[0].shape) for _ in expected]
    np.testing.assert_allclose(fast.scatter_patches(dpatches, hw, window, strides, pads),
                               ops.scatter_patches(dpatches, hw, window, strides, pads), **SAME_SUM)


@pytest.mark.parametrize("window, strides, padding, hw, channels, batch", FORMULA_CASES)
@pytest.mark.parametrize("jit", [False, True], ids=["ops", "compiled"])
def test_fast_conv_computes_the_formulas_of_ops(window, strides, padding, hw, channels, batch, jit):
    x, pads, normal = formula_case(window, strides, padding, hw, channels, batch)
    kernel, bias = normal((*window, channels, 5)), normal((5,))
    x_col_t = fast.im2col(x, jit=jit, window=window, strides=strides, pads=pads)
    np.testing.assert_array_equal(x_col_t, tf.transpose(ops.im2col(x, window, strides, pads)))
    dx_col = normal((x_col_t.shape[1], x_col_t.shape[0]))
    np.testing.assert_allclose(fast.col2im(dx_col, jit=jit, input_shape=x.shape, window=window, strides=strides,
                                           pads=pads),
                               ops.col2im(dx_col, x.shape, window, strides, pads), **SAME_SUM)
    y, x_col = ops.conv2d_forward(x, kernel, bias, strides, pads, "relu")
    y_fast, _ = fast.conv2d_forward(x, kernel, bias, strides, pads, "relu", jit)
    np.testing.assert_allclose(y_fast, y, **SAME_SUM)
    dy = normal(y.shape)
    expected = ops.conv2d_backward(dy, y, x_col, kernel, x.shape, strides, pads, "relu")
    actual = fast.conv2d_backward(dy, y, x_col_t, kernel, x.shape, strides, pads, "relu", jit)
    for name, a, e in zip(["dx", "dw", "db"], actual, expected, strict=True):
        np.testing.assert_allclose(a, e, **SAME_SUM, err_msg=name)


@pytest.mark.parametrize("window, strides, padding, hw, channels, batch", FORMULA_CASES)
@pytest.mark.parametrize("jit", [False, True], ids=["ops", "compiled"])
def test_fast_pools_compute_the_formulas_of_ops(window, strides, padding, hw, channels, batch, jit):
    x, pads, normal = formula_case(window, strides, padding, hw, channels, batch)
    settings = {"jit": jit, "window": window, "strides": strides, "pads": pads}
    y = ops.max_pool_forward(x, window, strides, pads)
    np.testing.assert_array_equal(fast.max_pool_forward(x, **settings), y)
    dy = normal(y.shape)
    np.testing.assert_allclose(fast.max_pool_backward(dy, x, y, **settings),
                               ops.max_pool_backward(dy, x, y, window, strides, pads), **SAME_SUM)
    np.testing.assert_allclose(fast.avg_pool_forward(x, **settings),
                               ops.avg_pool_forward(x, window, strides, pads), **SAME_SUM)
    np.testing.assert_allclose(fast.avg_pool_backward(dy, input_hw=hw, **settings),
                               ops.avg_pool_backward(dy, hw, window, strides, pads), **SAME_SUM)


# --------------------------------------------------------------------------- equality with the built-ins

SIZES = [(7, 9), (8, 8), (9, 7), (6, 11), (5, 5)]
CONV_CASES = [
    # (kernel, strides, padding, (h, w), channels, batch, filters, use_bias)
    (k, s, pad, SIZES[i % 5], 1 + i % 8, 1 + i % 4, (1, 2, 3, 5, 8)[i % 5], True)
    for i, (k, s, pad) in enumerate(itertools.product([1, 2, 3, 4, 5], [1, 2, 3], ["valid", "same"]))
] + [
    ((2, 3), 1, "valid", (7, 9), 3, 2, 4, True),
    ((3, 1), (1, 2), "same", (7, 9), 2, 3, 2, True),
    ((1, 4), (3, 2), "same", (10, 7), 5, 1, 3, True),
    ((5, 2), (2, 1), "valid", (9, 6), 4, 2, 6, True),
    (3, 2, "same", (7, 9), 3, 2, 4, False),
    (5, 1, "valid", (28, 28), 1, 4, 6, False),
    (4, 3, "valid", (11, 13), 8, 2, 16, True),
]


@pytest.mark.parametrize(
    "kernel, strides, padding, hw, channels, batch, filters, use_bias",
    CONV_CASES,
    ids=[f"k{c[0]}-s{c[1]}-{c[2]}-{c[3][0]}x{c[3][1]}-c{c[4]}-n{c[5]}-f{c[6]}-b{int(c[7])}" for c in CONV_CASES],
)
def test_conv_matches_builtin(kernel, strides, padding, hw, channels, batch, filters, use_bias, path):
    args = (filters, kernel)
    kwargs = {"strides": strides, "padding": padding, "use_bias": use_bias}
    x = random_input((batch, *hw, channels), seed=100 * filters + 10 * channels + batch)
    assert_twins(ScratchConv2D(*args, **kwargs), keras.layers.Conv2D(*args, **kwargs), x)


def test_conv_activation_matches_builtin(path):
    x = random_input((2, 7, 9, 3), seed=1)
    args = (4, 3)
    kwargs = {"padding": "same", "activation": "relu"}
    assert_twins(ScratchConv2D(*args, **kwargs), keras.layers.Conv2D(*args, **kwargs), x)


POOL_CASES = [
    # (pool_size, strides, padding, (h, w), channels, batch)
    (pool, strides, pad, SIZES[i % 5], 1 + (3 * i) % 8, 1 + i % 4)
    for i, ((pool, strides), pad) in enumerate(
        itertools.product(
            [(1, None), (2, None), (3, None), (2, 1), (3, 2), (3, 1), ((2, 3), None), ((3, 2), (1, 2)), (2, 3)],
            ["valid", "same"],
        )
    )
]
POOL_IDS = [f"p{c[0]}-s{c[1]}-{c[2]}-{c[3][0]}x{c[3][1]}-c{c[4]}-n{c[5]}" for c in POOL_CASES]


@pytest.mark.parametrize("pool, strides, padding, hw, channels, batch", POOL_CASES, ids=POOL_IDS)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pool_matches_builtin(pool, strides, padding, hw, channels, batch, ties, path):
    x = random_input((batch, *hw, channels), seed=len(POOL_IDS), ties=ties)
    scratch = ScratchMaxPool2D(pool, strides, padding)
    assert_twins(scratch, keras.layers.MaxPooling2D(pool, strides, padding), x)


@pytest.mark.parametrize("pool, strides, padding, hw, channels, batch", POOL_CASES, ids=POOL_IDS)
def test_avg_pool_matches_builtin(pool, strides, padding, hw, channels, batch, path):
    x = random_input((batch, *hw, channels), seed=3)
    scratch = ScratchAvgPool2D(pool, strides, padding)
    assert_twins(scratch, keras.layers.AveragePooling2D(pool, strides, padding), x)


def first_max_routing(x, g, pool, strides, pads):
    """Reference max-pool backward with loops: ``g[i, j]`` goes to the first maximum (row-major)
    of the real elements of window ``(i, j)``."""
    (ph, pw), (sh, sw), (top, left) = pool, strides, pads
    dx = np.zeros_like(x)
    for n, i, j, c in np.ndindex(g.shape):
        rows = range(max(i * sh - top, 0), min(i * sh - top + ph, x.shape[1]))
        cols = range(max(j * sw - left, 0), min(j * sw - left + pw, x.shape[2]))
        window = [(r, q) for r in rows for q in cols]
        r, q = max(window, key=lambda rq: (x[n, rq[0], rq[1], c], -window.index(rq)))
        dx[n, r, q, c] += g[n, i, j, c]
    return dx


@pytest.mark.parametrize(
    "hw, pool, strides, padding, pads",
    [
        ((6, 8), (2, 2), (2, 2), "valid", (0, 0)),  # constant windows, no overlap
        ((7, 7), (3, 3), (2, 2), "valid", (0, 0)),  # overlapping windows
        ((7, 7), (3, 3), (2, 2), "same", (1, 1)),  # + -inf padding (top/left 1)
        ((5, 8), (2, 3), (1, 2), "same", (0, 0)),  # padding only bottom/right
    ],
)
@pytest.mark.parametrize("pattern", ["constant", "repeated"])
def test_max_pool_ties_go_to_first_maximum(hw, pool, strides, padding, pads, pattern, path):
    rng = np.random.default_rng(7)
    if pattern == "constant":
        x = np.full((2, *hw, 3), 0.5, np.float32)
    else:  # only 3 distinct values: every window has repeated maxima
        x = rng.integers(0, 3, size=(2, *hw, 3)).astype(np.float32)
    layer = ScratchMaxPool2D(pool, strides, padding)
    g = rng.normal(size=layer.compute_output_shape(x.shape)).astype(np.float32)
    _, dx = outputs_and_grads(layer, x, g)
    np.testing.assert_allclose(dx, first_max_routing(x, g, pool, strides, pads), **TOL)
    _, dx_builtin = outputs_and_grads(keras.layers.MaxPooling2D(pool, strides, padding), x, g)
    np.testing.assert_allclose(dx, dx_builtin, **TOL)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7), (3, 2, 2), (4, 1, 1, 1)])
def test_flatten_matches_builtin(shape):
    assert_twins(ScratchFlatten(), keras.layers.Flatten(), random_input(shape, seed=5))


@pytest.mark.parametrize(
    "features, units, use_bias, batch, activation",
    [(5, 3, True, 2, None), (1, 1, True, 1, None), (7, 4, False, 3, None), (400, 120, True, 4, "relu")],
)
def test_dense_matches_builtin(features, units, use_bias, batch, activation):
    kwargs = {"use_bias": use_bias, "activation": activation}
    x = random_input((batch, features), seed=6)
    assert_twins(ScratchDense(units, **kwargs), keras.layers.Dense(units, **kwargs), x)


# --------------------------------------------------------------------------- float64 gradient checks


def relative_error(a, n):
    return np.max(np.abs(a - n)) / max(np.max(np.abs(a) + np.abs(n)), 1e-30)


def check_gradients(layer, x, h=1e-6, training=False):
    """Analytic vs central-difference gradients of ``L = Σ layer(x, training) * g`` for x and every
    weight, each evaluation from the layer's same state (in training: the same dropout draws)."""
    rng = np.random.default_rng(1)
    x = tf.Variable(x)
    g = tf.constant(rng.normal(size=layer(tf.convert_to_tensor(x)).shape))
    params, start = [x, *layer.trainable_weights], state(layer)

    @tf.function  # one graph call per evaluation: the differences below take hundreds
    def evaluate():
        set_state(layer, start)
        return tf.reduce_sum(layer(tf.convert_to_tensor(x), training=training) * g)

    def loss():
        return float(evaluate())

    with tf.GradientTape() as tape:
        value = evaluate()
    analytic = tape.gradient(value, params)
    for param, grad in zip(params, analytic, strict=True):
        base = param.numpy()
        numeric = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            for sign in (1, -1):
                shifted = base.copy()
                shifted[idx] += sign * h
                param.assign(shifted)
                numeric[idx] += sign * loss() / (2 * h)
        param.assign(base)
        assert grad.dtype == tf.float64
        assert relative_error(grad.numpy(), numeric) < 1e-7, param.name


@pytest.mark.parametrize(
    "kernel, strides, padding, use_bias",
    [(3, 1, "valid", True), ((2, 3), (2, 1), "same", True), (3, 2, "same", False)],
)
def test_conv_gradient_check(kernel, strides, padding, use_bias, path):
    kwargs = {"strides": strides, "padding": padding, "use_bias": use_bias, "bias_initializer": "random_normal"}
    layer = ScratchConv2D(3, kernel, dtype="float64", **kwargs)
    check_gradients(layer, np.random.default_rng(3).normal(size=(2, 5, 6, 2)))


def distinct_values(shape, seed):
    """A random permutation of well-separated values: no max flips under a 1e-6 nudge."""
    return np.random.default_rng(seed).permutation(np.prod(shape)).reshape(shape) * 0.1


@pytest.mark.parametrize("pool, strides, padding", [(2, None, "valid"), (3, 2, "same"), ((2, 3), (1, 2), "same")])
def test_max_pool_gradient_check(pool, strides, padding, path):
    check_gradients(ScratchMaxPool2D(pool, strides, padding, dtype="float64"), distinct_values((2, 5, 7, 2), 4))


@pytest.mark.parametrize("pool, strides, padding", [(2, None, "valid"), (3, 2, "same"), ((2, 3), (1, 2), "same")])
def test_avg_pool_gradient_check(pool, strides, padding, path):
    x = np.random.default_rng(5).normal(size=(2, 5, 7, 2))
    check_gradients(ScratchAvgPool2D(pool, strides, padding, dtype="float64"), x)


def test_flatten_gradient_check():
    check_gradients(ScratchFlatten(dtype="float64"), np.random.default_rng(6).normal(size=(2, 3, 2, 2)))


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_gradient_check(use_bias):
    layer = ScratchDense(4, use_bias=use_bias, bias_initializer="random_normal", dtype="float64")
    check_gradients(layer, np.random.default_rng(7).normal(size=(3, 5)))


# --------------------------------------------------------------------------- Keras conventions

TWIN_CONFIGS = [
    (ScratchConv2D, keras.layers.Conv2D, (4, 3), {}),
    (
        ScratchConv2D,
        keras.layers.Conv2D,
        (5, (2, 3)),
        {
            "strides": (2, 1),
            "padding": "same",
            "activation": "relu",
            "use_bias": False,
            "kernel_initializer": "he_normal",
            "bias_initializer": "ones",
        },
    ),
    (ScratchMaxPool2D, keras.layers.MaxPooling2D, (), {}),
    (ScratchMaxPool2D, keras.layers.MaxPooling2D, ((3, 2),), {"strides": (1, 2), "padding": "same"}),
    (ScratchAvgPool2D, keras.layers.AveragePooling2D, (3,), {"strides": 2, "padding": "same"}),
    (ScratchFlatten, keras.layers.Flatten, (), {}),
    (ScratchDense, keras.layers.Dense, (7,), {}),
    (
        ScratchDense,
        keras.layers.Dense,
        (3,),
        {"activation": "tanh", "use_bias": False, "kernel_initializer": "zeros", "bias_initializer": "ones"},
    ),
]
TWIN_IDS = [f"{s.__name__}-{i}" for i, (s, *_) in enumerate(TWIN_CONFIGS)]


@pytest.mark.parametrize("scratch_cls, builtin_cls, args, kwargs", TWIN_CONFIGS, ids=TWIN_IDS)
def test_config_round_trips_and_matches_builtin(scratch_cls, builtin_cls, args, kwargs):
    layer = scratch_cls(*args, name="twin", **kwargs)
    config = layer.get_config()
    assert scratch_cls.from_config(config).get_config() == config
    builtin_config = builtin_cls(*args, name="twin", **kwargs).get_config()
    shared = set(config) & set(builtin_config)
    assert {key: config[key] for key in shared} == {key: builtin_config[key] for key in shared}


def input_shape_for(layer_cls):
    return (None, 12) if layer_cls is ScratchDense else (None, 7, 9, 3)


@pytest.mark.parametrize("scratch_cls, builtin_cls, args, kwargs", TWIN_CONFIGS, ids=TWIN_IDS)
def test_weights_match_builtin(scratch_cls, builtin_cls, args, kwargs):
    scratch, builtin = scratch_cls(*args, **kwargs), builtin_cls(*args, **kwargs)
    shape = input_shape_for(scratch_cls)
    scratch.build(shape)
    builtin.build(shape)
    assert [w.shape for w in scratch.weights] == [w.shape for w in builtin.weights]
    assert [w.name for w in scratch.weights] == [w.name for w in builtin.weights]
    scratch.set_weights(builtin.get_weights())


@pytest.mark.parametrize("scratch_cls, builtin_cls, args, kwargs", TWIN_CONFIGS, ids=TWIN_IDS)
@pytest.mark.parametrize("batch", [None, 2])
def test_symbolic_shapes_match_builtin(scratch_cls, builtin_cls, args, kwargs, batch):
    shape = (batch, *input_shape_for(scratch_cls)[1:])
    scratch, builtin = scratch_cls(*args, **kwargs), builtin_cls(*args, **kwargs)
    assert scratch(keras.Input(batch_shape=shape)).shape == builtin(keras.Input(batch_shape=shape)).shape
    assert tuple(scratch.compute_output_shape(shape)) == tuple(builtin.compute_output_shape(shape))


def small_model():
    return keras.Sequential(
        [
            keras.Input((10, 9, 2)),
            ScratchConv2D(4, 3, padding="same", activation="relu"),
            ScratchMaxPool2D(3, 2, padding="same"),
            ScratchConv2D(3, (2, 3), strides=(1, 2), use_bias=False),
            ScratchAvgPool2D(2, padding="same"),
            ScratchFlatten(),
            ScratchDense(5, activation="softmax"),
        ]
    )


def test_keras_file_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = small_model()
    x = random_input((3, 10, 9, 2), seed=8)
    path = tmp_path / "scratch.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ScratchConv2D(0, 3), r"filters=0"),
        (lambda: ScratchConv2D(-2, 3), r"filters=-2"),
        (lambda: ScratchConv2D(True, 3), r"filters=True"),
        (lambda: ScratchConv2D(2, 0), r"kernel_size=0"),
        (lambda: ScratchConv2D(2, (3, -1)), r"kernel_size=\(3, -1\)"),
        (lambda: ScratchConv2D(2, (3, 3, 3)), r"kernel_size=\(3, 3, 3\)"),
        (lambda: ScratchConv2D(2, 3, strides=0), r"strides=0"),
        (lambda: ScratchConv2D(2, 3, padding="full"), r"padding='full'"),
        (lambda: ScratchMaxPool2D(0), r"pool_size=0"),
        (lambda: ScratchMaxPool2D(2, strides=(1, 0)), r"strides=\(1, 0\)"),
        (lambda: ScratchMaxPool2D((2, True)), r"pool_size=\(2, True\)"),
        (lambda: ScratchMaxPool2D(2, padding="causal"), r"padding='causal'"),
        (lambda: ScratchAvgPool2D("2"), r"pool_size='2'"),
        (lambda: ScratchAvgPool2D(2, padding=None), r"padding=None"),
        (lambda: ScratchDense(0), r"units=0"),
        (lambda: ScratchDense(2.5), r"units=2.5"),
        (lambda: ScratchConv2D(2, 5)(keras.Input((4, 6, 1))), r"kernel_size=\(5, 5\).*input_shape=\(None, 4, 6, 1\)"),
        (lambda: ScratchMaxPool2D(3)(keras.Input((2, 6, 1))), r"pool_size=\(3, 3\).*input_shape=\(None, 2, 6, 1\)"),
        (lambda: ScratchConv2D(2, 3)(keras.Input((8, 1))), r"4D input.*input_shape=\(None, 8, 1\)"),
        (lambda: ScratchAvgPool2D()(np.zeros((1, 4, 4, 1, 1), np.float32)), r"input_shape=\(1, 4, 4, 1, 1\)"),
        (lambda: ScratchDense(3)(keras.Input((4, 5))), r"2D input.*input_shape=\(None, 4, 5\)"),
    ],
)
def test_invalid_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_integers_become_python_ints():
    config = ScratchConv2D(np.int64(4), (np.int32(3), 2), strides=np.int64(2)).get_config()
    assert (config["filters"], config["kernel_size"], config["strides"]) == (4, (3, 2), (2, 2))
    assert all(type(v) is int for v in (config["filters"], *config["kernel_size"], *config["strides"]))


LAYER_CASES = [
    (lambda: ScratchConv2D(4, 3, strides=2, padding="same", activation="relu"), (2, 7, 9, 3)),
    (lambda: ScratchConv2D(2, (2, 3), use_bias=False), (3, 6, 5, 1)),
    (lambda: ScratchMaxPool2D(3, 2, "same"), (2, 7, 9, 3)),
    (lambda: ScratchAvgPool2D((2, 3), padding="same"), (2, 7, 9, 3)),
    (lambda: ScratchFlatten(), (2, 3, 4, 5)),
    (lambda: ScratchDense(6, activation="relu"), (4, 10)),
]
LAYER_IDS = ["conv", "conv-nobias", "maxpool", "avgpool", "flatten", "dense"]


@pytest.mark.parametrize("make, shape", LAYER_CASES, ids=LAYER_IDS)
@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_tf_function_matches_eager(make, shape, jit_compile):
    layer = make()
    x = random_input(shape, seed=9, ties=True)
    g = tf.constant(random_input(layer.compute_output_shape(shape), seed=10))
    eager = outputs_and_grads(layer, x, g)
    compiled = tf.function(outputs_and_grads, jit_compile=jit_compile)
    for a, e in zip(compiled(layer, tf.constant(x), g), eager, strict=True):
        np.testing.assert_allclose(a, e, **TOL)


def test_mixed_float16(path):
    x = random_input((4, 10, 9, 2), seed=11)
    keras.utils.set_random_seed(0)
    reference = small_model()
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        model = small_model()
        model.set_weights(reference.get_weights())
        with tf.GradientTape() as tape:
            y = model(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.range(5, dtype=tf.float32))
        grads = tape.gradient(loss, model.trainable_weights)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert y.dtype == tf.float16
    assert all(w.dtype == "float32" for w in model.weights)
    assert all(g.dtype == tf.float32 and np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(tf.cast(y, tf.float32), reference(x), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("make, shape", LAYER_CASES, ids=LAYER_IDS)
def test_no_builtin_conv_or_pool_ops(make, shape):
    def op_types(layer):
        return {node.op for node in traced_nodes(layer, shape)}

    scratch = make()
    scratch_ops = op_types(scratch)
    assert "IdentityN" in scratch_ops  # the custom gradient is in the traced graph
    assert not conv_pool_ops(scratch_ops)
    twin = {
        ScratchConv2D: keras.layers.Conv2D,
        ScratchMaxPool2D: keras.layers.MaxPooling2D,
        ScratchAvgPool2D: keras.layers.AveragePooling2D,
    }.get(type(scratch))
    if twin is not None:  # the check can fail: the built-in twin's graph does trip it
        assert conv_pool_ops(op_types(twin.from_config(scratch.get_config())))


MIRRORED_SCRIPT = """
import json, os
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
from models import layers as S

L = keras.layers
KINDS = {
    "builtin": (L.Conv2D, L.MaxPooling2D, L.AveragePooling2D, L.Flatten, L.Dense),
    "scratch": (S.ScratchConv2D, S.ScratchMaxPool2D, S.ScratchAvgPool2D, S.ScratchFlatten, S.ScratchDense),
}

def build(kind):
    conv, max_pool, avg_pool, flatten, dense = KINDS[kind]
    return keras.Sequential([
        keras.Input((12, 12, 1)),
        conv(4, 3, padding="same", activation="relu"),
        max_pool(2),
        conv(6, 3, strides=2),
        avg_pool(2, padding="same"),
        flatten(),
        dense(10, activation="softmax"),
    ])

rng = np.random.default_rng(0)
x = rng.random((64, 12, 12, 1), dtype=np.float32)
y = rng.integers(0, 10, 64)
keras.utils.set_random_seed(0)
init = build("builtin").get_weights()

def train(kind, strategy):
    with strategy.scope():
        model = build(kind)
        model.set_weights(init)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    return {"loss": history.history["loss"], "weights": [w.tolist() for w in model.get_weights()]}

mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "scratch_mirrored": train("scratch", mirrored),
    "builtin_mirrored": train("builtin", mirrored),
    "scratch_single": train("scratch", tf.distribute.get_strategy()),
}))
"""


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MIRRORED_SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    scratch = result["scratch_mirrored"]
    assert np.all(np.isfinite(scratch["loss"]))
    for other in ("builtin_mirrored", "scratch_single"):
        np.testing.assert_allclose(scratch["loss"], result[other]["loss"], **TOL)
        for a, e in zip(scratch["weights"], result[other]["weights"], strict=True):
            np.testing.assert_allclose(a, e, **TOL)
