"""Scratch layers against Keras's built-ins, alternating in one process (issue 14; `make bench`).

1. Whole model: images per CPU-second (and per wall second) of training steps, batch 128, for each
   architecture's builtin and scratch twins; the two alternate round by round so that a shared
   CPU slows both alike. Figures are medians over rounds; ratio = scratch / builtin.
2. One layer, forward + backward at LeNet's shapes, batch 128: CPU-milliseconds per step.

    python benchmarks/scratch_speed.py [--rounds 5] [--steps 20] [--models lenet,simple_conv,...]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import layers as S  # noqa: E402
from models.architectures import ARCHITECTURES, layer_kit  # noqa: E402

BATCH = 128
MODELS = ("lenet", "simple_conv", "lenet5_classic", "vgg_tiny")


def timed(fn, steps):
    """(CPU-seconds, wall seconds) of ``steps`` calls of ``fn``."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def train_step(arch, kind, images, labels):
    """One compiled training step (Adam, sparse cross-entropy) of ``arch`` built from ``kind`` layers."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(images.shape[1:]), *ARCHITECTURES[arch](layer_kit(kind), 10)])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.train_on_batch(images, labels)  # trace
    return lambda: model.train_on_batch(images, labels)


def whole_models(models, rounds, steps):
    rng = np.random.default_rng(0)
    images = rng.random((BATCH, 28, 28, 1), np.float32)
    labels = rng.integers(0, 10, BATCH)
    print(f"{'model':16}{'builtin img/CPU-s':>19}{'scratch img/CPU-s':>19}{'ratio CPU':>11}{'ratio wall':>12}")
    for arch in models:
        steps_of = {kind: train_step(arch, kind, images, labels) for kind in ("builtin", "scratch")}
        rates = {kind: [] for kind in steps_of}
        for _ in range(rounds):
            for kind, step in steps_of.items():
                cpu, wall = timed(step, steps)
                rates[kind].append((BATCH * steps / cpu, BATCH * steps / wall))
        ratio_cpu = statistics.median(s[0] / b[0] for b, s in zip(rates["builtin"], rates["scratch"], strict=True))
        ratio_wall = statistics.median(s[1] / b[1] for b, s in zip(rates["builtin"], rates["scratch"], strict=True))
        b_cpu = statistics.median(r[0] for r in rates["builtin"])
        s_cpu = statistics.median(r[0] for r in rates["scratch"])
        print(f"{arch:16}{b_cpu:19.0f}{s_cpu:19.0f}{ratio_cpu:11.2f}{ratio_wall:12.2f}", flush=True)


LAYERS = {  # name: (input shape without batch, builtin layer, scratch layer)
    "conv 5x5, 1->6, 28x28": ((28, 28, 1), lambda: keras.layers.Conv2D(6, 5), lambda: S.ScratchConv2D(6, 5)),
    "conv 5x5, 6->16, 12x12": ((12, 12, 6), lambda: keras.layers.Conv2D(16, 5), lambda: S.ScratchConv2D(16, 5)),
    "max-pool 2, 24x24x6": ((24, 24, 6), lambda: keras.layers.MaxPooling2D(2), lambda: S.ScratchMaxPool2D(2)),
    "max-pool 2, 8x8x16": ((8, 8, 16), lambda: keras.layers.MaxPooling2D(2), lambda: S.ScratchMaxPool2D(2)),
    "dense 256->120": ((256,), lambda: keras.layers.Dense(120), lambda: S.ScratchDense(120)),
}


def layer_step(layer, x, dy):
    layer.build(x.shape)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)

    step()
    return step


def layers_table(rounds, steps):
    rng = np.random.default_rng(0)
    print(f"\n{'layer (fwd+bwd, batch 128)':28}{'builtin CPU-ms':>16}{'scratch CPU-ms':>16}{'ratio':>8}")
    for name, (shape, builtin, scratch) in LAYERS.items():
        x = tf.constant(rng.standard_normal((BATCH, *shape)), tf.float32)
        dy = tf.constant(rng.standard_normal(builtin().compute_output_shape(x.shape)), tf.float32)
        steps_of = {"builtin": layer_step(builtin(), x, dy), "scratch": layer_step(scratch(), x, dy)}
        ms = {kind: [] for kind in steps_of}
        for _ in range(rounds):
            for kind, step in steps_of.items():
                ms[kind].append(1000 * timed(step, steps)[0] / steps)
        b, s = statistics.median(ms["builtin"]), statistics.median(ms["scratch"])
        print(f"{name:28}{b:16.2f}{s:16.2f}{b / s:8.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    whole_models(args.models.split(","), args.rounds, args.steps)
    layers_table(args.rounds, 5 * args.steps)


if __name__ == "__main__":
    main()
