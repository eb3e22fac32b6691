# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3. Pooling and flattening
#
# Pooling layers have no weights: they shrink a feature map by summarising each window, the largest value (max
# pooling) or the mean (average pooling). Their backward pass decides **which input pixel receives which part
# of the gradient**, and that is easiest to see in pictures. Flatten then lays a feature map out as one vector
# for the dense layers, and the order it uses matters as soon as there are several channels.
#
# Everything here runs through the lab's scratch layers (`models/layers.py`, whose math is `models/ops.py`)
# next to Keras's built-in twins, in the NHWC layout both use: (batch, height, width, channels).

# %%
import lesson  # first: TensorFlow then starts quietly

# isort: split
import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from matplotlib.patches import ConnectionPatch

from models import ops
from models.layers import ScratchAvgPool2D, ScratchFlatten, ScratchMaxPool2D

np.set_printoptions(precision=8, suppress=True)


def forward_backward(layer, x, upstream):
    """``layer(x)`` and the gradient at its input for the given upstream gradient (both NHWC, float64)."""
    x = tf.constant(np.asarray(x, np.float64))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    return y.numpy(), tape.gradient(y, x, output_gradients=tf.constant(np.asarray(upstream, np.float64))).numpy()


def twins(scratch_class, keras_class, x, upstream, **options):
    """Forward and backward of our layer and of Keras's, checked equal; ours returned."""
    ours = forward_backward(scratch_class(dtype="float64", **options), x, upstream)
    theirs = forward_backward(keras_class(dtype="float64", **options), x, upstream)
    for mine, builtin in zip(ours, theirs, strict=True):
        lesson.assert_close(mine, builtin, atol=1e-15)
    return ours


def routing(x, grad_out, dx, title, windows=(), arrows=()):
    """The input (left) and the gradient arriving at the output (right), arrows from each output cell to the
    input pixels its gradient goes to, and the gradient each input pixel receives (bottom)."""
    fig = plt.figure(figsize=(9, 6.5))
    ax_x, ax_g, ax_dx = fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2), fig.add_subplot(2, 1, 2)
    lesson.matrix(ax_x, x, "input x", fmt="{:g}", boxes=windows)
    lesson.matrix(ax_g, grad_out, "gradient at the output", fmt="{:g}")
    lesson.matrix(ax_dx, dx, "gradient at the input", fmt="{:g}", boxes=windows)
    for (r, c), (i, j) in arrows:  # one colour per output cell
        fig.add_artist(ConnectionPatch((c, r), (j, i), "data", "data", axesA=ax_g, axesB=ax_x, arrowstyle="->",
                                       color=f"C{r * grad_out.shape[1] + c}", lw=1.3, shrinkA=8, shrinkB=8))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


x = np.arange(1.0, 17.0).reshape(1, 4, 4, 1)  # 1 ... 16, one channel
upstream = np.array([[1.0, -1.0], [2.0, -2.0]]).reshape(1, 2, 2, 1)
blocks = [(0, 0, 2, 2), (0, 2, 2, 2), (2, 0, 2, 2), (2, 2, 2, 2)]

# %% [markdown]
# ## Max pooling: the whole gradient to the maximum
#
# A 2×2 window with stride 2 splits the 4×4 input into four blocks. Forward, each block gives its largest
# value; backward, that pixel alone gets the block's gradient (nudging any other pixel a little does not change
# the output), the others get 0.

# %%
y, dx = twins(ScratchMaxPool2D, keras.layers.MaxPooling2D, x, upstream, pool_size=2)
print("forward:\n", y[0, :, :, 0], "\nbackward:\n", dx[0, :, :, 0])
lesson.assert_close(y[0, :, :, 0], [[6, 8], [14, 16]], atol=0)
lesson.assert_close(dx[0, :, :, 0], [[0, 0, 0, 0], [0, 1, 0, -1], [0, 0, 0, 0], [0, 2, 0, -2]], atol=0)

fig = routing(x[0, :, :, 0], upstream[0, :, :, 0], dx[0, :, :, 0], "max pool 2×2: one arrow per window",
              windows=blocks, arrows=[((r, c), (2 * r + 1, 2 * c + 1)) for r in range(2) for c in range(2)])

# %% [markdown]
# ## Average pooling: the gradient shared out evenly
#
# Each output is the mean of its 4 pixels, $y = \frac{1}{4}\sum x$, so each pixel receives a quarter of the
# output's gradient.

# %%
y, dx = twins(ScratchAvgPool2D, keras.layers.AveragePooling2D, x, upstream, pool_size=2)
print("forward:\n", y[0, :, :, 0], "\nbackward:\n", dx[0, :, :, 0])
lesson.assert_close(y[0, :, :, 0], [[3.5, 5.5], [11.5, 13.5]], atol=0)
lesson.assert_close(dx[0, :, :, 0], [[0.25, 0.25, -0.25, -0.25], [0.25, 0.25, -0.25, -0.25],
                                     [0.5, 0.5, -0.5, -0.5], [0.5, 0.5, -0.5, -0.5]], atol=0)

fig = routing(x[0, :, :, 0], upstream[0, :, :, 0], dx[0, :, :, 0], "average pool 2×2: four arrows per window",
              windows=blocks, arrows=[((r, c), (2 * r + a, 2 * c + b))
                                      for r in range(2) for c in range(2) for a in range(2) for b in range(2)])

# %% [markdown]
# ## Ties: which maximum?
#
# When two pixels of a window share the maximum, the derivative is not defined: any split of the gradient
# between them is a valid choice. A mask `x == max` picks *all* of them and so hands out the gradient twice (or
# four times). TensorFlow gives it all to the **first** maximum in reading order (row by row), and the scratch
# layer does the same (`models.ops.first_max_masks`), so the two twins agree on ties too.

# %%
ties = np.array([[3, 7, 1, 1],
                 [7, 2, 1, 1],
                 [0, 5, 4, 4],
                 [5, 5, 4, 4]], np.float64).reshape(1, 4, 4, 1)
ones = np.ones((1, 2, 2, 1))  # a gradient of 1 at each output: where does each 1 go?
y, dx = twins(ScratchMaxPool2D, keras.layers.MaxPooling2D, ties, ones, pool_size=2)

# models.ops: the window's pixels at each offset (a, b), as one patch per offset, and a mask per offset that is
# true where that offset holds the window's first maximum; put back in place, the masks mark the chosen pixels.
patches = ops.window_patches(tf.constant(ties), (2, 2), (2, 2), ((0, 0), (0, 0)))
chosen = np.zeros((4, 4), bool)
for k, mask in enumerate(ops.first_max_masks(patches, tf.constant(y))):
    a, b = divmod(k, 2)
    chosen[a::2, b::2] = mask.numpy()[0, :, :, 0]
assert np.array_equal(chosen, dx[0, :, :, 0] != 0)

every_max = ties == np.repeat(np.repeat(y, 2, axis=1), 2, axis=2)  # each pixel equal to its window's maximum
naive = np.where(every_max, 1.0, 0.0)
lesson.assert_close(dx[0, :, :, 0], [[0, 1, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], atol=0)
# The first maximum passes on the gradient that came in; the mask multiplies it by the number of ties (2, 4, 3, 4).
assert dx.sum() == ones.sum() == 4 and naive.sum() == 2 + 4 + 3 + 4
print(f"gradient in: {ones.sum():g}; out with the first maximum: {dx.sum():g}, with x == max: {naive.sum():g}")

fig = lesson.matrices((ties[0, :, :, 0], "input with ties", {"fmt": "{:g}", "boxes": blocks}),
                      (naive[0, :, :, 0], "x == max: too much gradient", {"fmt": "{:g}", "boxes": blocks}),
                      (dx[0, :, :, 0], "first maximum: TensorFlow, ours", {"fmt": "{:g}", "boxes": blocks}))

# %% [markdown]
# ## Overlapping windows add up
#
# With stride 1 a 2×2 window overlaps its neighbours, and one pixel can be the maximum of several windows. It
# then receives the sum of their gradients. The input here has two channels; pooling treats each channel on
# its own (the last axis of NHWC rides along).

# %%
np.random.seed(1)
a_prev = np.random.randn(1, 4, 3, 2)  # a 4×3 map with 2 channels
grad = np.random.randn(1, 3, 2, 2)  # the gradient at the 3×2 output
y, dx = twins(ScratchMaxPool2D, keras.layers.MaxPooling2D, a_prev, grad, pool_size=2, strides=1)
assert y.shape == (1, 3, 2, 2)
lesson.assert_close(dx[0], [
    [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
    [[0.63296787, 0.0], [0.0, -1.48589535], [-0.81455098, 0.0]],
    [[0.0, 0.0], [-1.35841883, 0.0], [0.0, 0.0]],
    [[0.0, 0.0], [0.0, -0.85787024], [0.0, 0.0]],
], atol=5e-9)

def winner(i, j, channel):
    """The input pixel the window of output (i, j) takes its maximum from."""
    a, b = np.unravel_index(np.argmax(a_prev[0, i:i + 2, j:j + 2, channel]), (2, 2))
    return i + a, j + b


chosen = [(i, j) for i in range(3) for j in range(2) if winner(i, j, 0) == (1, 0)]
terms = [grad[0, i, j, 0] for i, j in chosen]
print(f"pixel (1, 0), channel 0, is the maximum of the windows at outputs {chosen}:")
print(" + ".join(f"{t:.8f}" for t in terms), f"= {sum(terms):.8f}")
assert chosen == [(0, 0), (1, 0)]
lesson.assert_close(sum(terms), 0.63296787, atol=5e-9)

fig, axes = plt.subplots(1, 4, figsize=(13, 4))
for channel in range(2):
    lesson.matrix(axes[2 * channel], a_prev[0, :, :, channel], f"input, channel {channel}", fmt="{:.2f}")
    lesson.matrix(axes[2 * channel + 1], dx[0, :, :, channel], f"gradient at the input, channel {channel}",
                  fmt="{:.3f}", boxes=[(1, 0, 1, 1)] if channel == 0 else ())
fig.tight_layout()

# %% [markdown]
# ## Flatten, and why NHWC order matters
#
# Flatten reads a map row by row and, within each pixel, channel by channel: in NHWC the channel index
# changes fastest. The same two channels written channels-first (NCHW, PyTorch's layout) flatten as one
# whole channel after the other. The values are the same; their order is not.

# %%
nchw = np.arange(1.0, 13.0).reshape(1, 2, 2, 3)  # 2 channels of 2×3: channel 0 holds 1..6, channel 1 holds 7..12
nhwc = nchw.transpose(0, 2, 3, 1)  # the same map, channels last: (1, 2, 3, 2)
flat, back = twins(ScratchFlatten, keras.layers.Flatten, nhwc, np.arange(1.0, 13.0).reshape(1, 12))
print("NHWC flatten:", flat[0], "\nNCHW flatten:", nchw.reshape(-1))
lesson.assert_close(flat[0], [1, 7, 2, 8, 3, 9, 4, 10, 5, 11, 6, 12], atol=0)
# Backward is the inverse reshape: the k-th gradient goes back to the k-th value read.
lesson.assert_close(back.reshape(-1), np.arange(1.0, 13.0), atol=0)
lesson.assert_close(back[0].transpose(2, 0, 1).reshape(-1), [1, 3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12], atol=0)

order = np.argsort(flat[0]).reshape(2, 2, 3)  # position in the NHWC vector of each value of channel c, row, col
fig = lesson.matrices(*[(order[c], f"channel {c}: place in the flat vector", {"fmt": "{:g}"}) for c in range(2)],
                      size=3.8)

# %% [markdown]
# So a dense layer after flatten sees its inputs in NHWC order. Weights trained in a channels-first framework
# have to be permuted, not just reshaped, to be used here.
#
# Next: [4. From layers to LeNet](04_from_layers_to_lenet.py) trains a whole network of these layers.
