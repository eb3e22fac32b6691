"""The scratch architectures use no TensorFlow convolution or pooling kernel, nor their gradients, and
no autodiff of their other layers (activations, batch normalization, dropout, global average pooling)
or of the scratch loss: the traced training-step graph (forward, loss and backward) of every
architecture's scratch twin is inspected op by op, nested function bodies included. The builtin twin
of the same step must show such ops, so the inspection itself is known to see them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.architectures import ARCHITECTURES, layer_kit
from models.layers import ScratchSparseCategoricalCrossentropy
from tests.graph_ops import AUTODIFF_OPS, graph_nodes
from tests.graph_ops import conv_pool_ops as forbidden


def step_op_types(layers, kind, input_shape=(28, 28, 1)):
    """Op types of one traced forward + backward training step of a model of ``layers`` built from
    ``kind`` layers, with the loss of that kind."""
    model = keras.Sequential([keras.Input(input_shape), *layers])
    scratch = kind == "scratch"
    loss_fn = ScratchSparseCategoricalCrossentropy() if scratch else keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_weights)

    x = tf.constant(np.zeros((2, *input_shape), np.float32))
    return {node.op for node in graph_nodes(step.get_concrete_function(x, tf.constant([0, 1])).graph)}


def architecture_op_types(arch, kind):
    return step_op_types(ARCHITECTURES[arch](layer_kit(kind), 10), kind)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_scratch_graph_has_no_conv_or_pool_kernel_nor_autodiff(arch):
    op_types = architecture_op_types(arch, "scratch")
    assert "MatMul" in op_types or "BatchMatMulV2" in op_types  # the backward pass is in the graph
    assert forbidden(op_types) == []
    assert sorted(op_types & AUTODIFF_OPS) == []


def test_builtin_graph_shows_the_forbidden_kernels():
    found = forbidden(architecture_op_types("lenet", "builtin"))
    assert {"Conv2D", "MaxPool"} <= set(found) and any("Backprop" in op for op in found), found


def norm_dropout_gap(kind):
    L = layer_kit(kind)
    return [L.Conv2D(2, 3, use_bias=False), L.BatchNorm(), L.Activation("relu"), L.Dropout(0.5),
            L.GlobalAvgPool2D(), L.Dense(3), L.BatchNorm(), L.Dense(3, activation="softmax")]


def test_batch_norm_dropout_and_global_pooling_steps_have_no_autodiff_in_scratch_and_some_in_builtin():
    """The same check on a step through the three layers that no architecture may yet use: the scratch
    step is clean, Keras's own trips it (RsqrtGrad and Tile of autodiff through the batch statistics)."""
    assert sorted(step_op_types(norm_dropout_gap("scratch"), "scratch", (6, 6, 1)) & AUTODIFF_OPS) == []
    assert {"RsqrtGrad", "Tile"} <= step_op_types(norm_dropout_gap("builtin"), "builtin", (6, 6, 1))
