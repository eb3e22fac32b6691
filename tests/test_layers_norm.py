"""Scratch batch normalization, dropout and global average pooling against their ``keras.layers`` twins.

* Equality in training and inference mode: outputs, the gradients of the input and of every weight
  under a random upstream gradient (in inference also of the moving statistics), the moving
  statistics a training call leaves (float32, ``atol=1e-5, rtol=1e-4``); a tiny model of the three
  trained step for step beside Keras's with copied weights (``atol=1e-4, rtol=1e-3`` after the steps,
  as tests/test_architectures.py).
* The moving statistics follow Keras's rule, recomputed here with NumPy; dropout draws Keras's mask
  from the same seed, keeps ``1 − rate`` of the units and scales them by ``1 / (1 − rate)``.
* Float64 central differences on every entry of the input and the weights, in both modes.
* ``models.gradcheck`` checks the three, in both modes, and leaves their state as it was.
* Keras conventions: configs, weight names, ``.keras`` files, argument errors, mixed precision, no
  autodiff in the traced backward graphs, ``MirroredStrategy`` (in a subprocess: 2 logical CPUs).
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import gradcheck
from models.architectures import layer_kit
from models.layers import (
    ScratchBatchNormalization,
    ScratchDropout,
    ScratchGlobalAveragePooling2D,
    ScratchSparseCategoricalCrossentropy,
)
from models.summary import agrees_with_keras, summarize
from tests.graph_ops import AUTODIFF_OPS, graph_nodes
from tests.test_layers import ROOT, TOL, check_gradients

TRAINED_TOL = {"atol": 1e-4, "rtol": 1e-3}
L = keras.layers


def random(shape, seed=0, scale=1.0, shift=0.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale + shift).astype(np.float32)


def outputs_and_gradients(layer, x, g, training, sources=()):
    """``[y, dL/dx, dL/dw for each trainable weight, dL/ds for each extra source]``, ``L = Σ y · g``."""
    x = tf.convert_to_tensor(x)
    sources = [s.value for s in sources]
    with tf.GradientTape() as tape:
        tape.watch([x, *sources])
        y = layer(x, training=training)
    return [y, *tape.gradient(y, [x, *layer.trainable_weights, *sources], output_gradients=g)]


def random_bn_weights(layer, seed):
    """Random gamma/beta/moving mean and a positive moving variance, in the layer's weight order."""
    rng = np.random.default_rng(seed)
    return [(np.abs(rng.normal(size=w.shape)) + 0.5 if "variance" in w.name else rng.normal(size=w.shape))
            .astype(np.float32) for w in layer.weights]


# --------------------------------------------------------------------------- batch normalization

BN_SHAPES = {"conv": (3, 5, 6, 4), "dense": (8, 5)}
BN_ARGS = {
    "default": {},
    "momentum-epsilon": {"momentum": 0.9, "epsilon": 1e-5},
    "no-center": {"center": False},
    "no-scale": {"scale": False},
    "neither": {"center": False, "scale": False},
}


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("kwargs", BN_ARGS.values(), ids=BN_ARGS.keys())
@pytest.mark.parametrize("shape", BN_SHAPES.values(), ids=BN_SHAPES.keys())
def test_batch_norm_matches_keras(shape, kwargs, training):
    """Outputs, every gradient (the moving statistics' too in inference, where they are inputs) and
    the moving statistics after the call."""
    builtin, scratch = L.BatchNormalization(**kwargs), ScratchBatchNormalization(**kwargs)
    builtin.build(shape), scratch.build(shape)
    assert [w.name for w in scratch.weights] == [w.name for w in builtin.weights]
    weights = random_bn_weights(builtin, seed=1)
    builtin.set_weights(weights), scratch.set_weights(weights)
    x, g = random(shape, seed=2, scale=3.0, shift=1.0), tf.constant(random(shape, seed=3))
    results = [outputs_and_gradients(layer, x, g, training, () if training else layer.non_trainable_weights)
               for layer in (builtin, scratch)]
    names = ["y", "dx", *(w.name for w in scratch.trainable_weights),
             *([] if training else ["dmoving_mean", "dmoving_variance"])]
    assert len(results[1]) == len(results[0]) == len(names)
    for name, a, e in zip(names, results[1], results[0], strict=True):
        np.testing.assert_allclose(a, e, **TOL, err_msg=name)
    for a, e in zip(scratch.non_trainable_weights, builtin.non_trainable_weights, strict=True):
        np.testing.assert_allclose(a, e, **TOL, err_msg=a.name)
    moved = not np.allclose(scratch.non_trainable_weights[0], weights[-2])
    assert moved is training  # training moves the statistics, inference leaves them


def test_moving_statistics_follow_keras_rule_with_the_biased_variance():
    """After N training calls: ``moving ← moving · momentum + batch · (1 − momentum)`` from the
    initial 0 and 1, with the batch's biased variance (NumPy's default ``ddof=0``)."""
    layer, momentum = ScratchBatchNormalization(momentum=0.8), 0.8
    mean, variance = np.zeros(3), np.ones(3)
    for step in range(4):
        x = random((2, 4, 4, 3), seed=step, scale=step + 1.0, shift=step)
        layer(x, training=True)
        mean = mean * momentum + x.mean(axis=(0, 1, 2)) * (1 - momentum)
        variance = variance * momentum + x.var(axis=(0, 1, 2)) * (1 - momentum)
    np.testing.assert_allclose(layer.moving_mean, mean, **TOL)
    np.testing.assert_allclose(layer.moving_variance, variance, **TOL)
    y = layer(x, training=False)  # inference normalizes with them
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(variance + 1e-3), **TOL)


def test_trainable_false_runs_batch_norm_in_inference_mode_as_keras():
    x = random((6, 4), seed=4, scale=2.0)
    for layer in (L.BatchNormalization(), ScratchBatchNormalization()):
        layer.build(x.shape)
        layer.trainable = False
        np.testing.assert_allclose(layer(x, training=True), x / np.sqrt(1 + 1e-3), **TOL)
        np.testing.assert_array_equal(layer.moving_mean, np.zeros(4))


def tiny_model(kind):
    """Conv → BN → ReLU → dropout → global average → dense → BN → ReLU → dropout → softmax, from a kit."""
    kit = layer_kit(kind)
    return keras.Sequential([
        keras.Input((8, 8, 2)),
        kit.Conv2D(6, 3, use_bias=False),
        kit.BatchNorm(momentum=0.8),
        kit.Activation("relu"),
        kit.Dropout(0.25),
        kit.GlobalAvgPool2D(),
        kit.Dense(8),
        kit.BatchNorm(momentum=0.8, center=False),
        kit.Activation("relu"),
        kit.Dropout(0.5, noise_shape=(None, 8)),
        kit.Dense(3, activation="softmax"),
    ])


@pytest.fixture(scope="module")
def trained_twins():
    """The builtin and scratch tiny models (same seed: the same dropout seeds; copied weights), each fit
    2 epochs of 4 SGD steps with its loss; returns them and their loss histories."""
    x, y = random((64, 8, 8, 2), seed=5, scale=2.0, shift=0.5), np.arange(64) % 3
    models = []
    for kind in ("builtin", "scratch"):
        keras.utils.set_random_seed(0)
        models.append(tiny_model(kind))
    models[1].set_weights(models[0].get_weights())
    histories = []
    for model, loss in zip(models, ("sparse_categorical_crossentropy", ScratchSparseCategoricalCrossentropy()),
                           strict=True):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
        histories.append(model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history["loss"])
    return models, histories, x


def test_tiny_model_trains_step_for_step_with_keras(trained_twins):
    (builtin, scratch), (expected, actual), x = trained_twins
    np.testing.assert_allclose(actual, expected, **TOL)
    for a, e in zip(scratch.weights, builtin.weights, strict=True):  # moving statistics included
        np.testing.assert_allclose(a, e, **TRAINED_TOL, err_msg=a.path)
    np.testing.assert_allclose(scratch.predict(x, verbose=0), builtin.predict(x, verbose=0), **TRAINED_TOL)


def test_tiny_model_moving_statistics_moved(trained_twins):
    (_, scratch), _, _ = trained_twins
    bn = scratch.layers[1]
    assert not np.allclose(bn.moving_mean, 0, atol=1e-3) and not np.allclose(bn.moving_variance, 1, atol=1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("kwargs", [{}, {"center": False, "scale": False}], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(2, 3, 3, 2), (5, 3)], ids=["conv", "dense"])
def test_batch_norm_gradient_check(shape, kwargs, training):
    layer = ScratchBatchNormalization(dtype="float64", epsilon=0.01, **kwargs)
    layer.build(shape)
    layer.set_weights([w.astype(np.float64) for w in random_bn_weights(layer, seed=6)])
    check_gradients(layer, np.random.default_rng(7).normal(size=shape) * 2 + 1, training=training)


def test_inference_gradient_of_the_moving_statistics_by_central_differences():
    """In inference the moving mean and variance are inputs of the formula: dμ and dσ² against float64
    central differences on every entry."""
    layer = ScratchBatchNormalization(dtype="float64")
    layer.build((4, 3))
    layer.set_weights([w.astype(np.float64) for w in random_bn_weights(layer, seed=8)])
    x, g = np.random.default_rng(9).normal(size=(4, 3)), np.random.default_rng(10).normal(size=(4, 3))
    _, _, _, _, dmean, dvariance = outputs_and_gradients(layer, x, g, False, layer.non_trainable_weights)
    for variable, analytic in zip(layer.non_trainable_weights, (dmean, dvariance), strict=True):
        base, numeric = variable.numpy(), np.zeros(3)
        for i in range(3):
            for sign in (1, -1):
                variable.assign(base + sign * 1e-6 * np.eye(3)[i])
                numeric[i] += sign * float(np.sum(layer(x, training=False) * g)) / 2e-6
        variable.assign(base)
        assert np.max(np.abs(analytic - numeric)) / np.max(np.abs(analytic) + np.abs(numeric)) < 1e-7


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("noise_shape", [None, (None, 1, 1, 3)], ids=["per-unit", "per-channel"])
def test_dropout_draws_keras_mask_from_the_same_seed(noise_shape):
    """Three successive training calls: the same outputs and gradients as Keras's Dropout of that seed,
    a gradient of ``g · keep / (1 − rate)`` (the forward pass's mask), and a new mask each call."""
    builtin, scratch = L.Dropout(0.4, noise_shape, seed=7), ScratchDropout(0.4, noise_shape, seed=7)
    x, g = random((4, 5, 5, 3), seed=11), tf.constant(random((4, 5, 5, 3), seed=12))
    masks = []
    for _ in range(3):
        (y_k, dx_k), (y, dx) = (outputs_and_gradients(layer, x, g, True) for layer in (builtin, scratch))
        np.testing.assert_array_equal(y, y_k)
        np.testing.assert_array_equal(dx, dx_k)
        keep = y.numpy() != 0
        np.testing.assert_allclose(y, np.where(keep, x / 0.6, 0), **TOL)
        np.testing.assert_allclose(dx, np.where(keep, g / 0.6, 0), **TOL)
        if noise_shape:
            assert np.all(keep == keep[:, :1, :1, :])  # one draw per sample and channel
        masks.append(keep)
    assert not np.array_equal(masks[0], masks[1])


def test_dropout_keeps_one_minus_rate_and_preserves_the_mean():
    y = ScratchDropout(0.3, seed=1)(np.ones((200, 500), np.float32), training=True).numpy()
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01  # 10⁵ draws: the sd of the fraction is 0.0014
    np.testing.assert_allclose(y[kept], 1 / 0.7, rtol=1e-6)
    assert abs(y.mean() - 1) < 0.02


def test_dropout_is_deterministic_under_a_seed():
    x = np.ones((8, 16), np.float32)

    def sequence(seed):
        layer = ScratchDropout(0.5, seed=seed)
        return [layer(x, training=True).numpy() for _ in range(2)]

    assert all(np.array_equal(a, b) for a, b in zip(sequence(3), sequence(3), strict=True))
    assert not np.array_equal(sequence(3)[0], sequence(4)[0])


@pytest.mark.parametrize("rate, training", [(0.5, False), (0.0, True)], ids=["inference", "rate-0"])
def test_dropout_is_the_identity_in_inference_and_at_rate_zero(rate, training):
    x, g = random((3, 4), seed=13), tf.constant(random((3, 4), seed=14))
    y, dx = outputs_and_gradients(ScratchDropout(rate, seed=1), x, g, training)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, g)


def test_dropout_gradient_check():
    check_gradients(ScratchDropout(0.5, seed=2, dtype="float64"), np.random.default_rng(15).normal(size=(3, 4)),
                    training=True)


# --------------------------------------------------------------------------- global average pooling


@pytest.mark.parametrize("keepdims", [False, True])
def test_global_average_pooling_matches_keras(keepdims):
    x = random((3, 5, 7, 4), seed=16)
    builtin, scratch = L.GlobalAveragePooling2D(keepdims=keepdims), ScratchGlobalAveragePooling2D(keepdims=keepdims)
    g = tf.constant(random(builtin(x).shape, seed=17))
    (y_k, dx_k), (y, dx) = (outputs_and_gradients(layer, x, g, None) for layer in (builtin, scratch))
    np.testing.assert_allclose(y, y_k, **TOL)
    np.testing.assert_allclose(dx, dx_k, **TOL)
    spread = np.broadcast_to(np.reshape(g, (3, 1, 1, 4)) / 35, x.shape)  # dy / (H·W) at every position
    np.testing.assert_allclose(dx, spread, **TOL)


def test_global_average_pooling_gradient_check():
    check_gradients(ScratchGlobalAveragePooling2D(dtype="float64"), np.random.default_rng(18).normal(size=(2, 3, 4, 2)))


# --------------------------------------------------------------------------- models.gradcheck


CHECKED = [
    (lambda: ScratchBatchNormalization(), lambda: L.BatchNormalization(), (6, 4, 4, 3)),
    (lambda: ScratchBatchNormalization(scale=False), lambda: L.BatchNormalization(scale=False), (6, 5)),
    (lambda: ScratchDropout(0.3, seed=4), lambda: L.Dropout(0.3, seed=4), (6, 4, 4, 3)),
    (lambda: ScratchGlobalAveragePooling2D(), lambda: L.GlobalAveragePooling2D(), (6, 4, 4, 3)),
]


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("make, twin, shape", CHECKED, ids=["bn-conv", "bn-dense", "dropout", "gap"])
def test_models_gradcheck_checks_the_layers_and_leaves_their_state(make, twin, shape, training):
    layer, reference = make(), twin()
    x = random(shape, seed=19, scale=2.0)
    layer(x), reference(x)
    before = gradcheck.state(layer), gradcheck.state(reference)
    table = gradcheck.check_layer(layer, reference=reference, x=x, training=training)
    assert table.passed, table
    suffix = " (training)" if training else ""
    assert {"output" + suffix, "input gradient" + suffix,
            "input gradient, float64 central differences" + suffix} <= {row.quantity for row in table.rows}
    for layer_state, after in zip(before, (gradcheck.state(layer), gradcheck.state(reference)), strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(layer_state, after, strict=True))


def test_check_model_covers_both_modes_and_leaves_the_models_as_they_were():
    keras.utils.set_random_seed(1)
    scratch = tiny_model("scratch")
    keras.utils.set_random_seed(2)  # other dropout seeds: the check gives the twin's draws to the scratch model
    builtin = tiny_model("builtin")
    before = gradcheck.state(scratch)
    table = gradcheck.check_model(scratch, builtin, random((4, 8, 8, 2), seed=20), np.arange(4) % 3)
    assert table.passed, table
    quantities = {(row.layer, row.quantity) for row in table.rows}
    assert ("model", "loss (training)") in quantities and ("model", "loss") in quantities
    assert (scratch.layers[1].name, "gamma gradient (training)") in quantities
    assert (scratch.layers[3].name, "input gradient (training)") in quantities
    assert all(np.array_equal(a, b) for a, b in zip(before, gradcheck.state(scratch), strict=True))


# --------------------------------------------------------------------------- Keras conventions

TWINS = [
    (ScratchBatchNormalization, L.BatchNormalization, {}),
    (ScratchBatchNormalization, L.BatchNormalization,
     {"momentum": 0.9, "epsilon": 1e-4, "center": False, "gamma_initializer": "random_normal",
      "gamma_regularizer": keras.regularizers.L2(0.01), "beta_constraint": keras.constraints.NonNeg()}),
    (ScratchDropout, L.Dropout, {"rate": 0.2, "noise_shape": (None, 1, 1, 3), "seed": 5}),
    (ScratchGlobalAveragePooling2D, L.GlobalAveragePooling2D, {"keepdims": True}),
]
TWIN_IDS = ["bn", "bn-args", "dropout", "gap"]


@pytest.mark.parametrize("scratch_cls, builtin_cls, kwargs", TWINS, ids=TWIN_IDS)
def test_config_round_trips_and_matches_builtin(scratch_cls, builtin_cls, kwargs):
    config = scratch_cls(name="twin", **kwargs).get_config()
    assert scratch_cls.from_config(config).get_config() == config
    builtin_config = builtin_cls(name="twin", **kwargs).get_config()
    assert set(config) <= set(builtin_config)  # Keras's names; Keras has more (renorm…)
    assert config == {key: builtin_config[key] for key in config}


@pytest.mark.parametrize("scratch_cls, builtin_cls, kwargs", TWINS, ids=TWIN_IDS)
@pytest.mark.parametrize("batch", [None, 2])
def test_weights_and_symbolic_shapes_match_builtin(scratch_cls, builtin_cls, kwargs, batch):
    scratch, builtin = scratch_cls(**kwargs), builtin_cls(**kwargs)
    inputs = keras.Input(batch_shape=(batch, 5, 6, 3))
    assert scratch(inputs).shape == builtin(inputs).shape
    assert [(w.name, w.shape, w.trainable) for w in scratch.weights] == [
        (w.name, w.shape, w.trainable) for w in builtin.weights]


def test_keras_file_round_trip(tmp_path, trained_twins):
    (_, scratch), _, x = trained_twins
    path = tmp_path / "scratch.keras"
    scratch.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in scratch.layers]
    assert [layer.get_config() for layer in loaded.layers] == [layer.get_config() for layer in scratch.layers]
    for a, e in zip(loaded.weights, scratch.weights, strict=True):  # the moving statistics too
        np.testing.assert_array_equal(a, e)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), scratch.predict(x, verbose=0))


@pytest.mark.parametrize("kind", ["builtin", "scratch"])
def test_summary_formulas_agree_with_keras(kind):
    """models.summary's rules for the kit's new kinds: BN has γ, β (each if used) and the two moving
    statistics per channel; dropout, activation and the global average keep or reduce the shape."""
    model = tiny_model(kind)
    rows = summarize(model, (8, 8, 2))
    assert agrees_with_keras(rows, model)
    assert [(row.shape, row.params) for row in rows if row.params == 24] == [((6, 6, 6), 4 * 6), ((8,), 3 * 8)]
    assert rows[4].shape == (6,)  # the global average


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ScratchBatchNormalization(momentum=1.5), r"momentum must be a number in \[0, 1\], .*momentum=1.5"),
        (lambda: ScratchBatchNormalization(epsilon=0), r"epsilon must be a number > 0, received epsilon=0"),
        (lambda: ScratchBatchNormalization(axis=-2), r"only the last axis .*received axis=-2"),
        (lambda: ScratchBatchNormalization(axis=1)(np.zeros((2, 3, 3, 2), np.float32)),
         r"normalized over its last axis, received input_shape=\(2, 3, 3, 2\) with axis=1"),
        (lambda: ScratchBatchNormalization()(np.zeros((3,), np.float32)), r"rank >= 2.*input_shape=\(3,\)"),
        (lambda: ScratchDropout(1.0), r"rate must be a number in \[0, 1\), received rate=1.0"),
        (lambda: ScratchDropout(-0.1), r"received rate=-0.1"),
        (lambda: ScratchDropout("0.5"), r"received rate='0.5'"),
        (lambda: ScratchDropout(0.5, noise_shape="x"), r"received noise_shape='x'"),
        (lambda: ScratchDropout(0.5, noise_shape=(2, 0)), r"received noise_shape=\(2, 0\)"),
        (lambda: ScratchDropout(0.5, seed=1.5), r"seed must be an integer or None, received seed=1.5"),
        (lambda: ScratchGlobalAveragePooling2D()(keras.Input((4, 3))), r"expected ndim=4"),
    ],
)
def test_invalid_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_axis_given_as_the_last_index_is_accepted():
    layer = ScratchBatchNormalization(axis=3)
    x = random((2, 3, 3, 2), seed=21)
    np.testing.assert_allclose(layer(x, training=True), L.BatchNormalization(axis=3)(x, training=True), **TOL)


def test_mixed_float16_batch_norm_computes_in_float32():
    x = random((4, 3, 3, 2), seed=22, scale=50.0, shift=200.0)  # x² overflows float16's 65,504
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        layer = ScratchBatchNormalization()
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.range(2, dtype=tf.float32))
        grads = tape.gradient(loss, layer.trainable_weights)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert y.dtype == tf.float16 and all(w.dtype == "float32" for w in layer.weights)
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(tf.cast(y, tf.float32), ScratchBatchNormalization()(x, training=True),
                               atol=1e-2, rtol=1e-2)


XLA_CASES = [
    (ScratchBatchNormalization, L.BatchNormalization, {}, (3, 4, 4, 2), True),
    (ScratchBatchNormalization, L.BatchNormalization, {}, (3, 4, 4, 2), False),
    (ScratchDropout, L.Dropout, {"rate": 0.5, "seed": 3}, (3, 6), True),
    (ScratchGlobalAveragePooling2D, L.GlobalAveragePooling2D, {}, (3, 4, 4, 2), None),
]


@pytest.mark.parametrize("scratch_cls, builtin_cls, kwargs, shape, training", XLA_CASES,
                         ids=["bn-training", "bn-inference", "dropout", "gap"])
def test_xla_compiled_matches_keras_compiled(scratch_cls, builtin_cls, kwargs, shape, training):
    """Both twins compiled by XLA: the same outputs, gradients and moving statistics. (XLA draws other
    uniform numbers than plain TensorFlow from the same seed, so dropout masks differ between the two
    ways, for Keras's layer as for ours.)"""
    x = random(shape, seed=24, scale=2.0)
    results = []
    for cls in (builtin_cls, scratch_cls):
        layer = cls(**kwargs)
        g = tf.constant(random(layer.compute_output_shape(shape), seed=25))
        compiled = tf.function(outputs_and_gradients, jit_compile=True)(layer, tf.constant(x), g, training)
        results.append([*compiled, *layer.non_trainable_weights[:2]])  # BN's moving statistics
    for a, e in zip(results[1], results[0], strict=True):
        np.testing.assert_allclose(a, e, **TOL)


# --------------------------------------------------------------------------- graphs


def traced_op_types(layer, shape, training):
    x = tf.constant(random(shape, seed=23))
    g = tf.ones(layer.compute_output_shape(shape))
    step = tf.function(lambda x: outputs_and_gradients(layer, x, g, training))
    return {node.op for node in graph_nodes(step.get_concrete_function(x).graph)}


GRAPH_CASES = [
    (lambda: ScratchBatchNormalization(), L.BatchNormalization, (2, 4, 4, 3), True),
    (lambda: ScratchBatchNormalization(), L.BatchNormalization, (2, 4, 4, 3), False),
    (lambda: ScratchDropout(0.5, seed=1), None, (2, 6), True),
    (lambda: ScratchGlobalAveragePooling2D(), L.GlobalAveragePooling2D, (2, 4, 4, 3), None),
]


@pytest.mark.parametrize("make, twin, shape, training", GRAPH_CASES,
                         ids=["bn-training", "bn-inference", "dropout", "gap"])
def test_backward_graphs_hold_no_autodiff(make, twin, shape, training):
    layer = make()
    op_types = traced_op_types(layer, shape, training)
    assert "IdentityN" in op_types  # the custom gradient is in the traced graph
    assert sorted(op_types & AUTODIFF_OPS) == []
    # Keras's twin, differentiated by TensorFlow, trips the check (its dropout leaves no op of its own).
    if twin is not None and training is not False:
        assert traced_op_types(twin.from_config(layer.get_config()), shape, training) & AUTODIFF_OPS


MIRRORED_SCRIPT = """
import json
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras
from models.layers import ScratchBatchNormalization

rng = np.random.default_rng(0)
x = rng.normal(size=(8, 3, 3, 2)).astype(np.float32)
x[4:] = 3 * x[4:] + 2  # the two replicas' halves have other statistics
g = rng.normal(size=x.shape).astype(np.float32)
weights = [rng.normal(size=2).astype(np.float32) for _ in range(2)] + [np.zeros(2, np.float32), np.ones(2, np.float32)]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

def local(values):
    return [v.numpy().tolist() for v in strategy.experimental_local_results(values)]

def run(layer):
    with strategy.scope():
        layer.build(x.shape)
        layer.set_weights(weights)
    batches = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, g)).batch(8))

    @tf.function
    def step(xb, gb):
        def replica(xr, gr):
            with tf.GradientTape() as tape:
                tape.watch(xr)
                y = layer(xr, training=True)
            return (y, *tape.gradient(y, [xr, *layer.trainable_weights], output_gradients=gr))
        return strategy.run(replica, args=(xb, gb))

    for _ in range(2):
        results = [step(*batch) for batch in batches][0]
    return {"y, dx, dgamma, dbeta per replica": [local(r) for r in results],
            "moving statistics per replica": [local(w.value) for w in layer.non_trainable_weights],
            "moving statistics read": [w.numpy().tolist() for w in layer.non_trainable_weights]}

out = {}
for synchronized in (False, True):
    for kind, cls in (("keras", keras.layers.BatchNormalization), ("scratch", ScratchBatchNormalization)):
        out[f"{kind}/{synchronized}"] = run(cls(momentum=0.5, synchronized=synchronized))
one = ScratchBatchNormalization(momentum=0.5)  # one device, the global batch of 8
one.build(x.shape)
one.set_weights(weights)
out["one device"] = one(x, training=True).numpy().tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def mirrored():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MIRRORED_SCRIPT)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("synchronized", [False, True])
def test_mirrored_batch_norm_matches_keras_replica_by_replica(mirrored, synchronized):
    """Two steps on 2 logical CPUs: per replica the same outputs, input and weight gradients (each
    replica's own, before the optimizer sums them) and moving statistics as Keras's layer."""
    keras_run, scratch_run = mirrored[f"keras/{synchronized}"], mirrored[f"scratch/{synchronized}"]
    for key in keras_run:
        for a, e in zip(scratch_run[key], keras_run[key], strict=True):
            np.testing.assert_allclose(a, e, **TOL, err_msg=key)


@pytest.mark.slow
def test_mirrored_batch_norm_per_replica_or_global_statistics(mirrored):
    """``synchronized=False``: each replica normalizes with its half's statistics and its copy of the
    moving statistics drifts apart from the other's (as Keras's do; reading the variable gives the
    first replica's); ``True``: the global batch's, as on one device, and the copies stay equal."""
    for synchronized, same_copies in ((False, False), (True, True)):
        means = mirrored[f"scratch/{synchronized}"]["moving statistics per replica"][0]
        assert np.allclose(means[0], means[1]) is same_copies
        read = mirrored[f"scratch/{synchronized}"]["moving statistics read"][0]  # as get_weights() and saving
        np.testing.assert_array_equal(read, means[0])  # the first replica's copy
    y_sync = np.concatenate(mirrored["scratch/True"]["y, dx, dgamma, dbeta per replica"][0])
    np.testing.assert_allclose(y_sync, mirrored["one device"], **TOL)
    y_local = np.concatenate(mirrored["scratch/False"]["y, dx, dgamma, dbeta per replica"][0])
    assert not np.allclose(y_local, mirrored["one device"], atol=1e-2)
