"""Architectures, each written once against a layer kit so that its builtin and scratch twins share
one definition: ``layers: builtin`` uses keras.layers, ``layers: scratch`` our models.layers.

Adding an architecture = one builder here + one file in conf/model/. Keras is imported where a model is
built, so that the names (``ARCHITECTURES``) can be checked without loading TensorFlow.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


def layer_kit(kind: str) -> SimpleNamespace:
    """The layer types an architecture is written with, from Keras or from models.layers."""
    if kind == "builtin":
        import keras

        L = keras.layers
        return SimpleNamespace(
            Conv2D=L.Conv2D, MaxPool2D=L.MaxPooling2D, AvgPool2D=L.AveragePooling2D,
            Flatten=L.Flatten, Dense=L.Dense, BatchNorm=L.BatchNormalization, Dropout=L.Dropout,
            GlobalAvgPool2D=L.GlobalAveragePooling2D, Activation=L.Activation,
        )
    if kind == "scratch":
        from models import layers as S

        return SimpleNamespace(
            Conv2D=S.ScratchConv2D, MaxPool2D=S.ScratchMaxPool2D, AvgPool2D=S.ScratchAvgPool2D,
            Flatten=S.ScratchFlatten, Dense=S.ScratchDense, BatchNorm=S.ScratchBatchNormalization,
            Dropout=S.ScratchDropout, GlobalAvgPool2D=S.ScratchGlobalAveragePooling2D, Activation=S.ScratchActivation,
        )
    raise ValueError(f"model.layers must be 'builtin' or 'scratch', got {kind!r}")


def lenet(L, num_classes):
    return [
        L.Conv2D(6, 5, activation="relu"),
        L.MaxPool2D(2),
        L.Conv2D(16, 5, activation="relu"),
        L.MaxPool2D(2),
        L.Flatten(),
        L.Dense(120, activation="relu"),
        L.Dense(84, activation="relu"),
        L.Dense(num_classes, activation="softmax"),
    ]


def simple_conv(L, num_classes):
    return [
        L.Conv2D(8, 3),
        L.MaxPool2D(2),
        L.Flatten(),
        L.Dense(num_classes, activation="softmax"),
    ]


def lenet5_classic(L, num_classes):
    """LeCun et al. 1998 within these five layer types; conf/model/lenet5_classic.yaml lists what
    is simplified. tanh activations, average-pool subsampling."""
    return [
        # C1. The paper pads 28x28 digits to 32x32. 'same' pads a 5x5 window by (5 - 1) / 2 = 2 zero
        # pixels on each side: exactly that border, so this is 'valid' on 32x32 and C5 ends at 1x1.
        L.Conv2D(6, 5, padding="same", activation="tanh"),
        L.AvgPool2D(2),  # S2
        L.Conv2D(16, 5, activation="tanh"),  # C3
        L.AvgPool2D(2),  # S4
        L.Conv2D(120, 5, activation="tanh"),  # C5
        L.Flatten(),
        L.Dense(84, activation="tanh"),  # F6
        L.Dense(num_classes, activation="softmax"),
    ]


def vgg_tiny(L, num_classes):
    """LeNet with each 5x5 conv replaced by two stacked 3x3 convs (valid, same output channels):
    the pair sees the same 5x5 window, so spatial sizes, pooling and dense head match LeNet's."""
    return [
        L.Conv2D(6, 3, activation="relu"),
        L.Conv2D(6, 3, activation="relu"),
        L.MaxPool2D(2),
        L.Conv2D(16, 3, activation="relu"),
        L.Conv2D(16, 3, activation="relu"),
        L.MaxPool2D(2),
        L.Flatten(),
        L.Dense(120, activation="relu"),
        L.Dense(84, activation="relu"),
        L.Dense(num_classes, activation="softmax"),
    ]


def lenet_wide(L, num_classes):
    """LeNet's shape with more filters (16 and 32) and one wider dense layer: enough capacity to pass
    99 % on MNIST within two epochs (conf/experiment/speedrun.yaml)."""
    return [
        L.Conv2D(16, 5, activation="relu"),
        L.MaxPool2D(2),
        L.Conv2D(32, 5, activation="relu"),
        L.MaxPool2D(2),
        L.Flatten(),
        L.Dense(128, activation="relu"),
        L.Dense(num_classes, activation="softmax"),
    ]


def conv_block(L, filters, batch_norm=True):
    """A 3x3 convolution without padding, batch normalization, ReLU; without batch normalization, the convolution
    with its bias and ReLU (with it the convolution has no bias: batch normalization's beta is one)."""
    if not batch_norm:
        return [L.Conv2D(filters, 3, activation="relu")]
    return [L.Conv2D(filters, 3, use_bias=False), L.BatchNorm(), L.Activation("relu")]


def bn_cnn(L, num_classes, batch_norm=True, dropout=0.3):
    """A small modern CNN: two stages of two conv-BN-ReLU blocks without padding, each ending in a 2x2 max pool
    (28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4), then a dense-BN-ReLU layer of 128 on the flattened 4x4x64 maps,
    dropout and the output layer (conf/experiment/strong.yaml). ``batch_norm=False`` and ``dropout=0`` are its
    ablations (``bn_cnn_no_bn``, ``bn_cnn_no_dropout``)."""
    head = ([L.Dense(128, use_bias=False), L.BatchNorm(), L.Activation("relu")] if batch_norm
            else [L.Dense(128, activation="relu")])
    return [
        *conv_block(L, 32, batch_norm), *conv_block(L, 32, batch_norm), L.MaxPool2D(2),
        *conv_block(L, 64, batch_norm), *conv_block(L, 64, batch_norm), L.MaxPool2D(2),
        L.Flatten(),
        *head,
        *([L.Dropout(dropout)] if dropout else []),
        L.Dense(num_classes, activation="softmax"),
    ]


def bn_tiny(L, num_classes):
    """Under 20,000 parameters: conv-BN-ReLU blocks without padding, 8 and 16 filters at full resolution (28 -> 26
    -> 24), a 2x2 max pool, then 24, 24 and 32 filters (12 -> 10 -> 8 -> 6), global average pooling and the output
    layer (conf/experiment/tiny.yaml)."""
    return [
        *conv_block(L, 8), *conv_block(L, 16), L.MaxPool2D(2),
        *conv_block(L, 24), *conv_block(L, 24), *conv_block(L, 32),
        L.GlobalAvgPool2D(),
        L.Dense(num_classes, activation="softmax"),
    ]


ARCHITECTURES = {
    "lenet": lenet,
    "simple_conv": simple_conv,
    "lenet5_classic": lenet5_classic,
    "vgg_tiny": vgg_tiny,
    "lenet_wide": lenet_wide,
    "bn_cnn": bn_cnn,
    "bn_cnn_no_bn": partial(bn_cnn, batch_norm=False),
    "bn_cnn_no_dropout": partial(bn_cnn, dropout=0),
    "bn_tiny": bn_tiny,
}


def build_model(cfg, input_shape, num_classes) -> keras.Sequential:
    """Build the architecture named by a ``model`` config for the given input shape and class count."""
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(
            f"model.architecture must be one of {sorted(ARCHITECTURES)}, got {cfg.architecture!r}"
        )
    import keras

    kit = layer_kit(cfg.layers)
    layers = ARCHITECTURES[cfg.architecture](kit, num_classes)
    return keras.Sequential([keras.Input(shape=tuple(input_shape)), *layers], name=cfg.name)


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers with a 4-D kernel (kh, kw, in, out): the builtin and the scratch convolutions."""
    return [layer for layer in model.layers if len(getattr(getattr(layer, "kernel", None), "shape", ())) == 4]


def conv_feature_maps(model: keras.Model, image) -> dict:
    """Every conv layer's output (H, W, F) for one input image (H, W, C), by layer name."""
    import keras

    convs = conv_layers(model)
    probe = keras.Model(model.inputs[0], [layer.output for layer in convs])
    maps = probe(image[None], training=False)
    maps = maps if isinstance(maps, list | tuple) else [maps]
    return {layer.name: keras.ops.convert_to_numpy(m[0]) for layer, m in zip(convs, maps, strict=True)}
