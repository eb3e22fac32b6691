"""What a ``layers: scratch`` run adds to a training run: the hand-derived loss it compiles with, and
the gradient check of its first training batch before fitting (``trainer.gradcheck``)."""

import keras

from models.layers import ScratchSparseCategoricalCrossentropy


def training_loss(model_cfg) -> keras.losses.Loss | str:
    """The fused, hand-derived softmax cross-entropy for scratch models; Keras's for builtin ones."""
    if model_cfg.layers == "scratch":
        return ScratchSparseCategoricalCrossentropy()
    return "sparse_categorical_crossentropy"
