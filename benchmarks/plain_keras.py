"""The seed notebook's plain Keras script, the yardstick of our pipeline's cost: LeNet (6 and 16
5x5 filters, max-pool 2, dense 120-84-10, ReLU), compile("adam", categorical cross-entropy),
model.fit on NumPy arrays at batch 128, validated on the 10,000 test images every epoch.

It trains on the same 55,000 images as `python train.py` (the bundled MNIST less the 5,000 held out
for validation), read from data/mnist.npz instead of downloading.

    python benchmarks/plain_keras.py [--epochs 3]      # as a whole process (benchmarks/fixed_cost.py)
"""

import argparse
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "data" / "mnist.npz"
TRAIN_IMAGES = 55_000
BATCH = 128


def lenet(keras):
    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(6, (5, 5), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Conv2D(16, (5, 5), activation="relu"), layers.MaxPooling2D((2, 2)),
        layers.Flatten(), layers.Dense(120, activation="relu"), layers.Dense(84, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])


def seed_recipe(epochs: int, callbacks=(), verbose="auto"):
    """Load, build, compile and fit as the seed does; returns the trained model."""
    import keras

    with np.load(DATA) as f:
        x_train, y_train, x_test, y_test = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
    x_train = x_train[:TRAIN_IMAGES].reshape(-1, 28, 28, 1).astype("float32") / 255.0
    x_test = x_test.reshape(-1, 28, 28, 1).astype("float32") / 255.0
    y_train = keras.utils.to_categorical(y_train[:TRAIN_IMAGES], 10)
    y_test = keras.utils.to_categorical(y_test, 10)
    model = lenet(keras)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=BATCH, validation_data=(x_test, y_test),
              callbacks=list(callbacks), verbose=verbose)
    return model


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    seed_recipe(parser.parse_args().epochs)
