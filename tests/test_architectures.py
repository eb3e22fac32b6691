"""Architectures as configured: builtin and scratch twins behave the same."""

import keras
import numpy as np
import pytest

from experiments.run.data import load_dataset
from experiments.run.scratch_run import training_loss
from models.architectures import build_model
from tests.conftest import compose_train

TWINS = ["lenet", "simple_conv", "lenet5_classic", "vgg_tiny"]
TOL = {"atol": 1e-5, "rtol": 1e-4}

# (output shape, parameters) of each layer on 28x28x1 MNIST, by hand: conv k·k·c_in·c_out + c_out,
# dense n_in·n_out + n_out; 'valid' n -> n - k + 1, 'same' keeps n, 2x2 pooling halves it.
LAYERS_BY_HAND = {
    "lenet5_classic": [  # 61,706
        ((28, 28, 6), 5 * 5 * 1 * 6 + 6),  # C1, 'same': 32 - 5 + 1 on the padded image
        ((14, 14, 6), 0),  # S2
        ((10, 10, 16), 5 * 5 * 6 * 16 + 16),  # C3
        ((5, 5, 16), 0),  # S4
        ((1, 1, 120), 5 * 5 * 16 * 120 + 120),  # C5
        ((120,), 0),
        ((84,), 120 * 84 + 84),  # F6
        ((10,), 84 * 10 + 10),
    ],
    "vgg_tiny": [  # 45,444
        ((26, 26, 6), 3 * 3 * 1 * 6 + 6),
        ((24, 24, 6), 3 * 3 * 6 * 6 + 6),
        ((12, 12, 6), 0),
        ((10, 10, 16), 3 * 3 * 6 * 16 + 16),
        ((8, 8, 16), 3 * 3 * 16 * 16 + 16),
        ((4, 4, 16), 0),
        ((256,), 0),
        ((120,), 256 * 120 + 120),
        ((84,), 120 * 84 + 84),
        ((10,), 84 * 10 + 10),
    ],
    "bn_tiny": [  # 17,522: conv k·k·c_in·c_out (no bias), batch normalization 4·c (gamma, beta, moving mean, variance)
        ((26, 26, 8), 3 * 3 * 1 * 8), ((26, 26, 8), 4 * 8), ((26, 26, 8), 0),
        ((24, 24, 16), 3 * 3 * 8 * 16), ((24, 24, 16), 4 * 16), ((24, 24, 16), 0),
        ((12, 12, 16), 0),
        ((10, 10, 24), 3 * 3 * 16 * 24), ((10, 10, 24), 4 * 24), ((10, 10, 24), 0),
        ((8, 8, 24), 3 * 3 * 24 * 24), ((8, 8, 24), 4 * 24), ((8, 8, 24), 0),
        ((6, 6, 32), 3 * 3 * 24 * 32), ((6, 6, 32), 4 * 32), ((6, 6, 32), 0),
        ((32,), 0),  # global average pooling
        ((10,), 32 * 10 + 10),
    ],
}


@pytest.fixture(scope="module")
def images():
    data = load_dataset(compose_train(["data.train_size=256", "data.val_size=100", "data.test_size=64"]).data)
    return data.x_train, data.y_train, data.x_test


@pytest.mark.parametrize("name", TWINS)
def test_twins_share_weights_predictions_and_training(name, images):
    """With the builtin twin's weights, the scratch twin predicts the same and, after several Adam
    steps on real images (each twin with the loss train.py compiles it with), has the same losses and
    weights."""
    x, y, x_test = images
    models, losses = [], []
    for model_name in (name, f"{name}_scratch"):
        cfg = compose_train([f"model={model_name}"])
        keras.utils.set_random_seed(0)
        models.append(build_model(cfg.model, cfg.data.input_shape, len(cfg.data.class_names)))
        losses.append(training_loss(cfg.model))  # Keras's loss for the builtin, ours for the scratch twin
    builtin, scratch = models
    assert [w.shape for w in scratch.weights] == [w.shape for w in builtin.weights]
    scratch.set_weights(builtin.get_weights())
    np.testing.assert_allclose(scratch.predict(x_test, verbose=0), builtin.predict(x_test, verbose=0), **TOL)

    history = []
    for model, loss in zip(models, losses, strict=True):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        history.append(model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history["loss"])
    np.testing.assert_allclose(history[1], history[0], **TOL)
    for a, b in zip(scratch.get_weights(), builtin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(scratch.predict(x_test, verbose=0), builtin.predict(x_test, verbose=0),
                               atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", [*LAYERS_BY_HAND, *(f"{name}_scratch" for name in LAYERS_BY_HAND)])
def test_layer_output_shapes_and_parameters_match_the_hand_computation(name):
    cfg = compose_train([f"model={name}"])
    net = build_model(cfg.model, cfg.data.input_shape, len(cfg.data.class_names))
    expected = LAYERS_BY_HAND[name.removesuffix("_scratch")]
    assert [(tuple(layer.output.shape[1:]), layer.count_params()) for layer in net.layers] == expected
    assert net.count_params() == sum(params for _, params in expected)
