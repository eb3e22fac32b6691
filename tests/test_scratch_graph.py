"""The scratch architectures use no TensorFlow convolution or pooling kernel, nor their gradients:
the traced training-step graph (forward, loss and backward) of every architecture's scratch twin is
inspected op by op, nested function bodies included. The builtin twin of the same step must show
such ops, so the inspection itself is known to see them."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.architectures import ARCHITECTURES, layer_kit
from tests.graph_ops import conv_pool_ops as forbidden
from tests.graph_ops import graph_nodes


def step_op_types(arch, kind):
    """Op types of one traced forward + backward step of ``arch`` built from ``kind`` layers."""
    model = keras.Sequential([keras.Input((28, 28, 1)), *ARCHITECTURES[arch](layer_kit(kind), 10)])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_weights)

    x = tf.constant(np.zeros((2, 28, 28, 1), np.float32))
    return {node.op for node in graph_nodes(step.get_concrete_function(x, tf.constant([0, 1])).graph)}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_scratch_graph_has_no_conv_or_pool_kernel(arch):
    op_types = step_op_types(arch, "scratch")
    assert "MatMul" in op_types or "BatchMatMulV2" in op_types  # the backward pass is in the graph
    assert forbidden(op_types) == []


def test_builtin_graph_shows_the_forbidden_kernels():
    found = forbidden(step_op_types("lenet", "builtin"))
    assert {"Conv2D", "MaxPool"} <= set(found) and any("Backprop" in op for op in found), found
