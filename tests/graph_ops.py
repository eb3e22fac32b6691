"""What the scratch layers' traced graphs must not contain, in one place, and how a graph's ops are read.

The scratch conv and pool layers compute with TensorFlow primitives and give their own gradients: their
forward and backward graphs hold no convolution or pooling kernel of TensorFlow, nor any of those
kernels' gradients (tests/test_layers.py per layer, tests/test_scratch_graph.py per architecture's
training step). The scratch activations, the loss, batch normalization, dropout and global average
pooling likewise hold no kernel of theirs nor an autodiff gradient (tests/test_activations.py,
tests/test_layers_norm.py, and every architecture's training step in tests/test_scratch_graph.py).
"""

import fnmatch

# TensorFlow's convolution and pooling kernels and their gradients (fnmatch patterns of op types).
CONV_POOL_OPS = (
    "Conv2D",
    "_FusedConv2D",
    "Conv2DBackprop*",  # Conv2DBackpropInput, Conv2DBackpropFilter
    "DepthwiseConv2dNative*",
    "MaxPool*",  # MaxPool, MaxPoolV2, MaxPoolGrad, MaxPoolGradV2, MaxPoolGradGrad, MaxPoolWithArgmax
    "AvgPool*",  # AvgPool, AvgPoolGrad
    "*PoolGrad*",
    "ExtractImagePatches",
)

# TensorFlow's kernels of activations, the cross-entropy and batch normalization, and the op types that
# autodiff leaves where a formula's gradient is not written out: the gradient of 1/√(σ² + ε) (RsqrtGrad)
# and of a mean or sum, which TensorFlow spreads back with a Tile (batch statistics, a global average).
AUTODIFF_OPS = {
    "Relu", "ReluGrad", "Sigmoid", "SigmoidGrad", "TanhGrad", "Softmax", "LogSoftmax",
    "SoftmaxCrossEntropyWithLogits", "SparseSoftmaxCrossEntropyWithLogits",
    "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3",
    "FusedBatchNormGrad", "FusedBatchNormGradV2", "FusedBatchNormGradV3", "RsqrtGrad", "Tile",
}


def graph_nodes(graph):
    """Every node of a traced ``tf.Graph``, those of the functions it calls (its library) included."""
    graph_def = graph.as_graph_def()
    return list(graph_def.node) + [node for fn in graph_def.library.function for node in fn.node_def]


def conv_pool_ops(op_types):
    """The op types among ``op_types`` that :data:`CONV_POOL_OPS` forbids, sorted."""
    return sorted(op for op in op_types if any(fnmatch.fnmatchcase(op, p) for p in CONV_POOL_OPS))
