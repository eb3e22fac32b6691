"""Architectures as configured: builtin and scratch twins behave the same."""

import keras
import numpy as np
import pytest

from experiments.data import load_dataset
from models.architectures import build_model
from tests.conftest import compose_train

TWINS = ["lenet", "simple_conv"]
TOL = {"atol": 1e-5, "rtol": 1e-4}


@pytest.fixture(scope="module")
def images():
    data = load_dataset(compose_train(["data.train_size=256", "data.val_size=100", "data.test_size=64"]).data)
    return data.x_train, data.y_train, data.x_test


@pytest.mark.parametrize("name", TWINS)
def test_twins_share_weights_predictions_and_training(name, images):
    """With the builtin twin's weights, the scratch twin predicts the same and, after several Adam
    steps on real images, has the same losses and weights."""
    x, y, x_test = images
    models = []
    for model_name in (name, f"{name}_scratch"):
        cfg = compose_train([f"model={model_name}"])
        keras.utils.set_random_seed(0)
        models.append(build_model(cfg.model, cfg.data.input_shape, len(cfg.data.class_names)))
    builtin, scratch = models
    assert [w.shape for w in scratch.weights] == [w.shape for w in builtin.weights]
    scratch.set_weights(builtin.get_weights())
    np.testing.assert_allclose(scratch.predict(x_test, verbose=0), builtin.predict(x_test, verbose=0), **TOL)

    losses = []
    for model in models:
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        losses.append(model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0).history["loss"])
    np.testing.assert_allclose(losses[1], losses[0], **TOL)
    for a, b in zip(scratch.get_weights(), builtin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(scratch.predict(x_test, verbose=0), builtin.predict(x_test, verbose=0),
                               atol=1e-4, rtol=1e-3)
