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
# # 1. Convolution by hand
#
# A convolution layer slides a small grid of weights, the **kernel**, over its input and writes one number per
# position: the sum of the input values under the kernel, each times the weight above it. For an input $X$ and
# a $k_h \times k_w$ kernel $K$ (no padding, stride 1):
#
# $$Y_{i,j} = \sum_{a=0}^{k_h-1} \sum_{b=0}^{k_w-1} X_{i+a,\,j+b}\; K_{a,b}$$
#
# (Deep-learning libraries call this a convolution; a mathematician would call it a cross-correlation, since
# the kernel is not flipped.)
#
# This notebook works one example through by hand, then shows the same numbers coming out of the lab's own
# code: the formulas in `models/ops.py`, the shapes and parameter counts in `models/summary.py`, and the
# `ScratchConv2D` layer next to Keras's `Conv2D`.

# %%
import lesson  # first: TensorFlow then starts quietly

# isort: split
import keras
import matplotlib.pyplot as plt
import numpy as np

from models import ops, summary
from models.layers import ScratchConv2D

np.set_printoptions(precision=8, suppress=True)

# %% [markdown]
# ## The worked example: a 5×5 image and a 2×2 kernel

# %%
image, kernel = lesson.IMAGE, lesson.KERNEL
print(f"image:\n{image}\nkernel:\n{kernel}")

# %% [markdown]
# The first output, $Y_{0,0}$, covers the top-left 2×2 window of the image. Four products, one sum:

# %%
window = image[0:2, 0:2]
products = window * kernel
for (a, b), p in np.ndenumerate(products):
    print(f"X[{a},{b}] · K[{a},{b}] = {window[a, b]:5.2f} · {kernel[a, b]:5.2f} = {p:+.4f}")
y00 = products.sum()
print(f"Y[0,0] = {y00:.4f}")
assert abs(y00 - 0.2491) < 1e-12

# %% [markdown]
# Sliding the window one step at a time, right then down, gives every output. A 5-wide input has room for
# 5 − 2 + 1 = 4 positions of a 2-wide window along each axis, so $Y$ is 4×4:

# %%
def correlate(x, k):
    """Y[i, j] = sum over a, b of x[i + a, j + b] * k[a, b]: the formula above as two loops."""
    rows, cols = x.shape[0] - k.shape[0] + 1, x.shape[1] - k.shape[1] + 1
    y = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            y[i, j] = np.sum(x[i:i + k.shape[0], j:j + k.shape[1]] * k)
    return y


by_hand = correlate(image, kernel)
print(by_hand)
expected = np.array([
    [0.2491, -0.1648, 0.2652, -0.3406],
    [0.1089, 0.3092, -0.2989, 0.0098],
    [-0.224, 0.612, -0.0912, -0.2841],
    [-0.3309, 0.477, -0.2673, 0.1892],
])
lesson.assert_close(by_hand, expected, atol=1e-12)

# %% [markdown]
# The window that makes $Y_{1,1} = 0.3092$ (the output's largest value in its top-left quarter), drawn on the
# image, and where that value lands:

# %%
fig = lesson.matrices(
    (image, "image X (5×5)", {"fmt": "{:.2f}", "boxes": [(1, 1, 2, 2)]}),
    (kernel, "kernel K (2×2)", {"fmt": "{:.2f}"}),
    (by_hand, "Y = X ⋆ K (4×4)", {"boxes": [(1, 1, 1, 1)]}),
)

# %% [markdown]
# ## How big is the output? How many weights?
#
# With zero padding $P$ on each side and a stride $S$, a window of width $F$ fits
#
# $$\left\lfloor \frac{N + 2P - F}{S} \right\rfloor + 1$$
#
# times along an axis of length $N$. A conv layer with $C_\text{in}$ input channels and $C_\text{out}$ filters
# holds $k_h k_w C_\text{in} C_\text{out}$ weights plus $C_\text{out}$ biases; a dense layer $n_\text{in}
# n_\text{out} + n_\text{out}$. The lab writes these as `models.summary.conv_output_size`, `conv_params` and
# `dense_params`:

# %%
cases = [  # (N, F, S, P) -> output size
    ((5, 2, 1, 0), 4),  # the worked example
    ((28, 3, 1, 1), 28),  # padding 1 with a 3-wide window keeps the size: Keras's padding="same"
    ((144, 3, 1, 0), 142),
    ((60, 3, 1, 0), 58),
    ((20, 3, 2, 0), 9),  # (20 - 3) / 2 + 1 = 9.5, floored
]
for (n, f, s, p), size in cases:
    computed = summary.conv_output_size(n, f, s, p)
    print(f"N={n:3} F={f} S={s} P={p}:  ({n} + 2·{p} − {f}) // {s} + 1 = {computed}")
    assert computed == size

# 3×3 conv layers: 3 -> 6 channels, 24 -> 48, 10 -> 20
assert [summary.conv_params(3, 3, c_in, c_out) for c_in, c_out in [(3, 6), (24, 48), (10, 20)]] == [168, 10416, 1820]

# %% [markdown]
# LeNet on a 28×28 MNIST digit, layer by layer (conv 6@5×5, max pool 2, conv 16@5×5, max pool 2, flatten,
# dense 120, 84, 10), with the formulas alone:

# %%
side = 28
side = summary.conv_output_size(side, 5)  # conv 1: 24
side = summary.conv_output_size(side, 2, 2)  # pool 1: 12
side = summary.conv_output_size(side, 5)  # conv 2: 8
side = summary.conv_output_size(side, 2, 2)  # pool 2: 4
flat = side * side * 16
by_formula = {
    "conv 1": summary.conv_params(5, 5, 1, 6),
    "conv 2": summary.conv_params(5, 5, 6, 16),
    "dense 120": summary.dense_params(flat, 120),
    "dense 84": summary.dense_params(120, 84),
    "dense 10": summary.dense_params(84, 10),
}
print(f"flatten: {side}·{side}·16 = {flat} values", by_formula, f"total {sum(by_formula.values()):,}", sep="\n")
assert (flat, list(by_formula.values())) == (256, [156, 2416, 30840, 10164, 850])
assert sum(by_formula.values()) == 44_426

# %% [markdown]
# `python -m models.summary` does the same for any configured model, then checks every row against the
# model Keras builds (the "Keras" column says `same` where they agree):

# %%
cfg, model = summary.configured_model(["model=lenet"])
rows = summary.summarize(model, cfg.data.input_shape)
print(summary.format_table(rows, model.count_params()))
assert all(row.agrees for row in rows) and model.count_params() == 44_426
assert [row.params for row in rows if row.params] == list(by_formula.values())

# %% [markdown]
# ## im2col: a convolution as one matrix product
#
# Loops are slow. Instead, copy every window of the image into one row of a matrix, $X_\text{col}$ (one row per
# output position, one column per kernel offset), and flatten the kernel into a column $W$. Then every output
# at once is
#
# $$Y = X_\text{col}\, W$$
#
# `models.ops.im2col` builds $X_\text{col}$ for a batch of NHWC images (batch, height, width, channels):

# %%
x = image[None, :, :, None]  # one image, one channel
no_padding = ((0, 0), (0, 0))
x_col = ops.im2col(x, window=(2, 2), strides=(1, 1), pads=no_padding).numpy()
print("X_col:", x_col.shape, "(16 windows × 4 offsets)")
np.testing.assert_array_equal(x_col[0], image[0:2, 0:2].ravel())  # row 0 is the first window
np.testing.assert_array_equal(x_col[5], image[1:3, 1:3].ravel())  # row 5 = output (1, 1)

fig, (left, right) = plt.subplots(1, 2, figsize=(8, 7), gridspec_kw={"width_ratios": [4, 1.3]})
lesson.matrix(left, x_col, "X_col: row i·4 + j holds window (i, j)", fmt="{:.2f}", boxes=[(5, 0, 1, 4)])
left.set_yticks(range(16), [f"({i},{j})" for i in range(4) for j in range(4)])
left.set_xticks(range(4), ["K[0,0]", "K[0,1]", "K[1,0]", "K[1,1]"])
lesson.matrix(right, x_col @ kernel.reshape(4, 1), "X_col · W", fmt="{:.4f}", boxes=[(5, 0, 1, 1)])
right.set_yticks([])
right.set_xticks([])
for ax in (left, right):
    ax.set_aspect("auto")
fig.tight_layout()

lesson.assert_close((x_col @ kernel.reshape(4, 1)).reshape(4, 4), by_hand, atol=1e-12)

# %% [markdown]
# `models.ops.conv2d_forward` is exactly that, $Y = \mathrm{act}(X_\text{col} W + b)$, with the kernel in Keras's
# layout (height, width, in channels, filters). It also returns $X_\text{col}$, which the backward pass needs
# (notebook 2):

# %%
y, _ = ops.conv2d_forward(x, kernel[:, :, None, None], None, strides=(1, 1), pads=no_padding)
lesson.assert_close(y.numpy()[0, :, :, 0], by_hand, atol=1e-12)

# %% [markdown]
# ## The scratch layer and Keras's, on the same numbers
#
# `ScratchConv2D` is the layer the lab's `*_scratch` models train with. It takes Keras's arguments and weight
# layout, so the same kernel can be set in both:

# %%
def conv_pair(filters, kernel_size, strides=1, padding="valid", input_shape=(1, 5, 5, 1), seed=0):
    """Keras's Conv2D and our ScratchConv2D, built for ``input_shape``, holding the same random weights."""
    builtin = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, dtype="float64")
    builtin.build(input_shape)
    rng = np.random.default_rng(seed)
    builtin.set_weights([rng.normal(size=w.shape) for w in builtin.get_weights()])
    scratch = ScratchConv2D(filters, kernel_size, strides=strides, padding=padding, dtype="float64")
    scratch.build(input_shape)
    scratch.set_weights(builtin.get_weights())
    return builtin, scratch


builtin, scratch = conv_pair(1, 2)
builtin.set_weights([kernel[:, :, None, None], np.zeros(1)])
scratch.set_weights(builtin.get_weights())
for layer in (builtin, scratch):
    out = layer(x).numpy()[0, :, :, 0]
    print(f"{type(layer).__name__}:\n{out}")
    lesson.assert_close(out, expected, atol=1e-12)

# %% [markdown]
# And on a case the worked example does not cover: a 7×7 input with 3 channels, 4 filters of 3×3, stride 2,
# `padding="same"`. TensorFlow's "same" makes the output $\lceil 7 / 2 \rceil = 4$ wide and pads as little as that
# needs: $(4 - 1) \cdot 2 + 3 - 7 = 2$ zeros, one on each side (an odd total puts the extra one at the bottom
# and right).

# %%
builtin, scratch = conv_pair(4, 3, strides=2, padding="same", input_shape=(1, 7, 7, 3))
x7 = np.random.default_rng(1).normal(size=(1, 7, 7, 3))
out_builtin, out_scratch = builtin(x7).numpy(), scratch(x7).numpy()
print("output shape:", out_scratch.shape, " largest difference:", np.abs(out_scratch - out_builtin).max())
assert out_scratch.shape == (1, 4, 4, 4) == (1, summary.same_output_size(7, 2), 4, 4)
assert ops.same_padding(7, 3, 2) == (1, 1) and ops.same_padding(8, 3, 2) == (0, 1)
lesson.assert_close(out_scratch, out_builtin, atol=1e-12)

# %% [markdown]
# Next: [2. Backpropagation by hand](02_backpropagation_by_hand.py) takes this image and kernel through a
# pooling layer, a sigmoid and a dense layer, and back.
