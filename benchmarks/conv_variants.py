"""Training throughput of LeNet-5 built from different conv / pool implementations.

Times ``model.fit`` (Adam, batch 128, ``jit_compile=False``) on synthetic MNIST-shaped data for:

* ``builtin``        keras.layers Conv2D / MaxPooling2D / Flatten / Dense (oneDNN kernels);
* ``scratch``        models.layers (transposed im2col + one matmul, stride-phase patches);
* ``patches_einsum`` conv = ``tf.image.extract_patches`` + einsum, autodiff backward;
* ``concat_im2col``  conv = NHWC im2col by concatenating the K patches on the channel axis
                     (the textbook layout), col2im by splitting the column gradient back;
* ``tile_maxpool``   scratch conv, max pool = reshape to (N, Ho, p, Wo, p, C) + reduce_max, with a
                     cumsum first-max mask (the "pool == stride" fast path).

The variants run side by side in one process, alternating their order every round; the medians
of images per wall-second and images per CPU-second (``time.process_time``, all threads) are
reported, the latter because wall time on a shared 2-core machine is bimodal.

    .venv/bin/python benchmarks/conv_variants.py [--rounds 5] [--steps 20] [--variants builtin scratch]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import fast, ops  # noqa: E402
from models import layers as S  # noqa: E402

BATCH = 128


class _PatchesEinsumConv2D(S.ScratchConv2D):
    """Conv via ``tf.image.extract_patches`` (NHWC, (kh, kw, C) patch order) + einsum; autodiff."""

    def call(self, inputs):
        kh, kw = self.kernel_size
        patches = tf.image.extract_patches(
            inputs, [1, kh, kw, 1], [1, *self.strides, 1], [1, 1, 1, 1], self.padding.upper()
        )
        kernel = tf.reshape(tf.convert_to_tensor(self.kernel), [-1, self.filters])
        return self.activation(tf.einsum("nhwk,kf->nhwf", patches, kernel) + tf.convert_to_tensor(self.bias))


def _concat_conv2d(x, kernel, bias, strides, padding):
    """NHWC im2col: cols (N, Ho, Wo, K*C) = concat of the K patches; dX = split + scatter."""
    input_hw, window, filters = tuple(x.shape[1:3]), tuple(kernel.shape[:2]), kernel.shape[3]
    pads = ops.window_pads(*input_hw, window, strides, padding)

    @tf.custom_gradient
    def conv(x, kernel, bias):
        cols = tf.concat(fast.window_patches(x, window, strides, pads), axis=-1)
        x_col = tf.reshape(cols, [-1, cols.shape[-1]])
        w2 = tf.reshape(kernel, [-1, filters])
        y = tf.reshape(tf.matmul(x_col, w2) + bias, [-1, *cols.shape[1:3], filters])

        def grad(dy):
            dy2 = tf.reshape(dy, [-1, filters])
            dcols = tf.reshape(tf.matmul(dy2, w2, transpose_b=True), tf.shape(cols))
            dpatches = tf.split(dcols, window[0] * window[1], axis=-1)
            dx = fast.scatter_patches(dpatches, input_hw, window, strides, pads)
            dw = tf.reshape(tf.matmul(x_col, dy2, transpose_a=True), tf.shape(kernel))
            return dx, dw, tf.reduce_sum(dy2, axis=0)

        return y, grad

    return conv(x, kernel, bias)


class _ConcatIm2colConv2D(S.ScratchConv2D):
    def call(self, inputs):
        kernel, bias = tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(self.bias)
        return self.activation(_concat_conv2d(inputs, kernel, bias, self.strides, self.padding))


def _tile_max_pool2d(x, pool, strides, padding):
    """pool == stride, no padding: (N, H, W, C) -> tiles (N, Ho, p, Wo, p, C) -> reduce_max."""
    if tuple(strides) != tuple(pool) or padding != "valid":
        raise ValueError(f"tile pooling needs strides == pool and 'valid', received {strides=}, {padding=}")
    (ph, pw), (_, h, w, c) = pool, x.shape
    ho, wo = h // ph, w // pw

    @tf.custom_gradient
    def pool_fn(x):
        tiles = tf.reshape(x[:, : ho * ph, : wo * pw, :], [-1, ho, ph, wo, pw, c])
        y = tf.reduce_max(tiles, axis=[2, 4])

        def grad(dy):
            window_last = tf.reshape(tf.transpose(tiles, [0, 1, 3, 5, 2, 4]), [-1, ho, wo, c, ph * pw])
            is_max = tf.cast(tf.equal(window_last, y[..., None]), tf.int32)
            first = tf.logical_and(is_max > 0, tf.cumsum(is_max, axis=-1) == 1)
            dwin = tf.where(first, dy[..., None], tf.zeros([], dy.dtype))
            dtiles = tf.transpose(tf.reshape(dwin, [-1, ho, wo, c, ph, pw]), [0, 1, 4, 2, 5, 3])
            dx = tf.reshape(dtiles, [-1, ho * ph, wo * pw, c])
            return tf.pad(dx, [[0, 0], [0, h - ho * ph], [0, w - wo * pw], [0, 0]])

        return y, grad

    return pool_fn(x)


class _TileMaxPool2D(S.ScratchMaxPool2D):
    pool_fn = staticmethod(_tile_max_pool2d)


VARIANTS = {
    "builtin": (keras.layers.Conv2D, keras.layers.MaxPooling2D, keras.layers.Flatten, keras.layers.Dense),
    "scratch": (S.ScratchConv2D, S.ScratchMaxPool2D, S.ScratchFlatten, S.ScratchDense),
    "patches_einsum": (_PatchesEinsumConv2D, S.ScratchMaxPool2D, S.ScratchFlatten, S.ScratchDense),
    "concat_im2col": (_ConcatIm2colConv2D, S.ScratchMaxPool2D, S.ScratchFlatten, S.ScratchDense),
    "tile_maxpool": (S.ScratchConv2D, _TileMaxPool2D, S.ScratchFlatten, S.ScratchDense),
}


def lenet(conv, pool, flatten, dense):
    """LeNet-5: Conv 6@5x5 relu -> MaxPool2 -> Conv 16@5x5 relu -> MaxPool2 -> 120 -> 84 -> 10."""
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            conv(6, 5, activation="relu"),
            pool(2),
            conv(16, 5, activation="relu"),
            pool(2),
            flatten(),
            dense(120, activation="relu"),
            dense(84, activation="relu"),
            dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=False)
    return model


def synthetic_mnist(steps):
    rng = np.random.default_rng(0)
    x = rng.random((steps * BATCH, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, steps * BATCH)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache()


def run(variants, rounds, steps):
    data = synthetic_mnist(steps)
    models = {}
    for name in variants:
        keras.utils.set_random_seed(0)
        models[name] = lenet(*VARIANTS[name])
        models[name].fit(data, epochs=1, verbose=0, shuffle=False)  # trace + warm up
    images = steps * BATCH
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for r in range(rounds):
        for name in variants[r % len(variants) :] + variants[: r % len(variants)]:
            t0, c0 = time.perf_counter(), time.process_time()
            models[name].fit(data, epochs=1, verbose=0, shuffle=False)
            wall[name].append(images / (time.perf_counter() - t0))
            cpu[name].append(images / (time.process_time() - c0))
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in variants}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed fit() calls per variant (median taken)")
    parser.add_argument("--steps", type=int, default=20, help="batches of 128 per timed fit() call")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs; LeNet-5 fit, batch {BATCH},")
    print(f"{args.steps} steps per round, {args.rounds} rounds, medians\n")
    results = run(args.variants, args.rounds, args.steps)
    base = results.get("builtin")
    print(f"{'variant':16s} {'img/s wall':>11s} {'img/CPU-s':>10s} {'ratio wall':>11s} {'ratio CPU':>10s}")
    for name, (wall, cpu) in results.items():
        ratios = f"{wall / base[0]:11.2f} {cpu / base[1]:10.2f}" if base else ""
        print(f"{name:16s} {wall:11.0f} {cpu:10.0f} {ratios}")


if __name__ == "__main__":
    main()
