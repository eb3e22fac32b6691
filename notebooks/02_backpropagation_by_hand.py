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
# # 2. Backpropagation by hand
#
# Training needs, for every weight, how much the loss $L$ changes when that weight moves: $\partial L /
# \partial w$. Backpropagation gets all of them in one backward sweep: each layer receives $\delta_\text{out} =
# \partial L / \partial(\text{its output})$ from the layer above and passes $\delta_\text{in} = \partial L /
# \partial(\text{its input})$ to the layer below, taking its own weights' gradients on the way.
#
# The network here is the smallest CNN with every kind of layer: the 5×5 image and 2×2 kernel of notebook 1,
# a 2×2 max pool, a sigmoid, flatten, and a dense layer from 4 values to 2 (bias 0). We are handed
# $\delta$ at the dense layer's output, $[0.25, -0.15]$, and walk it back to the image, then take one gradient
# descent step with learning rate $\eta = 0.5$. Every number is computed from its formula with NumPy first,
# then by the lab's own backward functions (`models/ops.py`), then by TensorFlow's automatic differentiation on
# Keras's built-in layers, and last by the lab's gradient check (`models/gradcheck.py`).

# %%
import lesson  # first: TensorFlow then starts quietly

# isort: split
import keras
import numpy as np
import tensorflow as tf
from IPython.display import Markdown, display

from models import ops
from models.gradcheck import check_layer, outputs_and_grads
from models.layers import ScratchActivation, ScratchConv2D, ScratchDense, ScratchMaxPool2D

np.set_printoptions(precision=8, suppress=True)


def show(name, formula, value):
    print(f"{name} = {formula}\n{np.asarray(value)}\n")


# %%
image, kernel = lesson.IMAGE, lesson.KERNEL  # notebook 1's
dense_w = np.array([[0.61, 0.82, 0.96, -1.00],  # row o: the weights into output o (2 outputs × 4 inputs)
                    [0.02, -0.50, 0.23, 0.17]])
dense_b = np.zeros(2)
delta_z = np.array([0.25, -0.15])  # ∂L/∂z at the dense layer's output, given
eta = 0.5

# %% [markdown]
# ## Forward
#
# $Y = X \star K$ (notebook 1), $P$ = the largest value of each 2×2 block of $Y$, $S = \sigma(P) = 1 / (1 +
# e^{-P})$, $s$ = $S$ flattened row by row, $z = W s + b$.

# %%
y = ops.conv2d_forward(image[None, :, :, None], kernel[:, :, None, None], None, (1, 1), ((0, 0), (0, 0)))[0]
y = y.numpy()[0, :, :, 0]
p = y.reshape(2, 2, 2, 2).max(axis=(1, 3))  # block (r, c) is y[2r:2r+2, 2c:2c+2]
sig = 1 / (1 + np.exp(-p))
s = sig.ravel()
z = dense_w @ s + dense_b
show("P", "max over each 2×2 block of Y", p)
show("S", "1 / (1 + exp(−P))", sig)
show("z", "W s + b", z)
lesson.assert_close(p, [[0.3092, 0.2652], [0.612, 0.1892]], atol=1e-12)
lesson.assert_close(sig, [[0.57668998, 0.56591413], [0.64839689, 0.5471594]], atol=5e-9)
lesson.assert_close(z, [0.89113209, -0.02927488], atol=5e-9)

# %% [markdown]
# ## Backward, one layer at a time
#
# **Dense**, $z = W s + b$: each output $z_o$ depends on $w_{o,i}$ through $s_i$, and each $s_i$ feeds every
# output with weight $w_{o,i}$:
#
# $$\frac{\partial L}{\partial w_{o,i}} = \delta_{z,o}\, s_i, \qquad \frac{\partial L}{\partial b_o} =
# \delta_{z,o}, \qquad \delta_{s,i} = \sum_o w_{o,i}\, \delta_{z,o}$$

# %%
d_w = np.outer(delta_z, s)
d_b = delta_z
delta_s = dense_w.T @ delta_z
show("∂L/∂W", "δz sᵀ", d_w)
show("∂L/∂b", "δz", d_b)
show("δs", "Wᵀ δz", delta_s)
lesson.assert_close(d_w, [[0.14417249, 0.14147853, 0.16209922, 0.13678985],
                                 [-0.0865035, -0.08488712, -0.09725953, -0.08207391]], atol=5e-9)
lesson.assert_close(delta_s, [0.1495, 0.28, 0.2055, -0.2755], atol=1e-12)

# %% [markdown]
# **Flatten** only reorders values: its $\delta$ is the same numbers put back in the 2×2 shape.
# **Sigmoid**: $\sigma'(p) = \sigma(p)\,(1 - \sigma(p))$, so $\delta_P = \delta_S \odot S \odot (1 - S)$,
# computed from the layer's output alone.

# %%
delta_p = delta_s.reshape(2, 2) * sig * (1 - sig)
show("δP", "δS ⊙ S ⊙ (1 − S)", delta_p)
lesson.assert_close(delta_p, [[0.03649574, 0.06878349], [0.04684955, -0.06826229]], atol=5e-9)

# %% [markdown]
# **Max pool**: only the largest value of each block reached the output, so only it receives the block's
# $\delta$; the three others get 0 (moving them a little changes nothing above).

# %%
delta_y = np.zeros_like(y)
for r in range(2):
    for c in range(2):
        block = y[2 * r:2 * r + 2, 2 * c:2 * c + 2]
        a, b = np.unravel_index(np.argmax(block), block.shape)
        delta_y[2 * r + a, 2 * c + b] = delta_p[r, c]
show("δY", "δP at each block's maximum, 0 elsewhere", delta_y)
lesson.assert_close(delta_y, [[0, 0, 0.06878349, 0], [0, 0.03649574, 0, 0],
                                     [0, 0.04684955, 0, 0], [0, 0, 0, -0.06826229]], atol=5e-9)

# %% [markdown]
# **Convolution**, $Y_{i,j} = \sum_{a,b} X_{i+a,j+b} K_{a,b}$: weight $K_{a,b}$ met pixel $X_{i+a,j+b}$ in output
# $(i,j)$, and pixel $X_{m,n}$ met every kernel weight whose window covered it:
#
# $$\frac{\partial L}{\partial K_{a,b}} = \sum_{i,j} \delta_{Y,i,j}\, X_{i+a,\,j+b}, \qquad \delta_{X,m,n} =
# \sum_{(i,j)\ \text{covering}\ (m,n)} \delta_{Y,i,j}\, K_{m-i,\,n-j}$$
#
# The first is the image correlated with $\delta_Y$; the second stamps a copy of $K$, scaled by $\delta_{Y,i,j}$,
# at every output position.

# %%
d_kernel = np.array([[np.sum(delta_y * image[a:a + 4, b:b + 4]) for b in range(2)] for a in range(2)])
delta_x = np.zeros_like(image)
for (i, j), d in np.ndenumerate(delta_y):
    delta_x[i:i + 2, j:j + 2] += d * kernel
show("∂L/∂K", "Σ δY[i,j] X[i+a, j+b]", d_kernel)
show("δX", "Σ δY[i,j] K stamped at (i, j)", delta_x)
lesson.assert_close(d_kernel, [[0.04474314, 0.09433226], [0.01082693, 0.06850172]], atol=5e-9)
lesson.assert_close(delta_x, [
    [0.0, 0.0, -0.00894185, 0.01031752, 0.0],
    [0.0, -0.00474445, -0.02960522, 0.04264576, 0.0],
    [0.0, -0.02470327, 0.02965479, 0.0, 0.0],
    [0.0, -0.02389327, 0.02904672, 0.0088741, -0.01023934],
    [0.0, 0.0, 0.0, 0.03481377, -0.04232262],
], atol=5e-9)

# %% [markdown]
# Where the gradient went: only four outputs of the convolution receive anything (the block maxima), and each
# spreads it over the 2×2 patch of pixels it was computed from.

# %%
fig = lesson.matrices(
    (delta_y, "δY: routed by the max pool", {"fmt": "{:.4f}", "boxes": [(0, 0, 2, 2), (0, 2, 2, 2), (2, 0, 2, 2),
                                                                        (2, 2, 2, 2)]}),
    (d_kernel, "∂L/∂K", {"fmt": "{:.4f}"}),
    (delta_x, "δX: K stamped at each δY", {"fmt": "{:.4f}", "fontsize": 7}),
    size=3.6,
)

# %% [markdown]
# ## One gradient descent step
#
# Every weight moves against its gradient: $w \leftarrow w - \eta\, \partial L / \partial w$.

# %%
kernel_new, dense_w_new, dense_b_new = kernel - eta * d_kernel, dense_w - eta * d_w, dense_b - eta * d_b
show("K", "K − 0.5 ∂L/∂K", kernel_new)
show("W", "W − 0.5 ∂L/∂W", dense_w_new)
show("b", "b − 0.5 ∂L/∂b", dense_b_new)
lesson.assert_close(kernel_new, [[-0.15237157, 0.10283387], [-0.51541346, 0.58574914]], atol=5e-9)
lesson.assert_close(dense_w_new, [[0.53791375, 0.74926073, 0.87895039, -1.06839493],
                                         [0.06325175, -0.45755644, 0.27862977, 0.21103696]], atol=5e-9)
lesson.assert_close(dense_b_new, [-0.125, 0.075], atol=1e-12)

# %% [markdown]
# ## The lab's backward functions
#
# The scratch layers' backward passes are these formulas, written once in `models/ops.py` for whole batches
# (NHWC: batch, height, width, channels; Keras's weight layouts: a dense kernel is (inputs, outputs), the
# transpose of $W$ above). Fed the same $\delta$s, they give the same numbers:

# %%
def nhwc(a):
    return tf.constant(np.asarray(a)[None, :, :, None])


dx_s, dw_dense, db_dense = ops.dense_backward(tf.constant(delta_z[None]), tf.constant(z[None]),
                                              tf.constant(s[None]), tf.constant(dense_w.T))
d_sigmoid = ops.sigmoid_backward(nhwc(delta_s.reshape(2, 2)), nhwc(sig))
d_pool = ops.max_pool_backward(nhwc(delta_p), nhwc(y), nhwc(p), (2, 2), (2, 2), ((0, 0), (0, 0)))
y_lab, x_col = ops.conv2d_forward(nhwc(image), tf.constant(kernel[:, :, None, None]), None, (1, 1), ((0, 0), (0, 0)))
dx_conv, dk_conv, _ = ops.conv2d_backward(nhwc(delta_y), y_lab, x_col, tf.constant(kernel[:, :, None, None]),
                                          (1, 5, 5, 1), (1, 1), ((0, 0), (0, 0)))
for name, lab, hand in [("δs", dx_s.numpy()[0], delta_s), ("∂L/∂W", dw_dense.numpy().T, d_w),
                        ("∂L/∂b", db_dense.numpy(), d_b), ("δP", d_sigmoid.numpy()[0, :, :, 0], delta_p),
                        ("δY", d_pool.numpy()[0, :, :, 0], delta_y), ("δX", dx_conv.numpy()[0, :, :, 0], delta_x),
                        ("∂L/∂K", dk_conv.numpy()[:, :, 0, 0], d_kernel)]:
    print(f"{name:6} models.ops against by hand: largest difference {np.abs(lab - hand).max():.1e}")
    lesson.assert_close(lab, hand, atol=1e-15)

# %% [markdown]
# ## TensorFlow's automatic differentiation on Keras's layers
#
# Keras's built-in `Conv2D`, `MaxPooling2D`, `Flatten` and `Dense` have no hand-written backward pass of ours.
# `tf.GradientTape` records the forward pass and differentiates it; `output_gradients` hands it $\delta_z$.
# One `SGD` step at learning rate 0.5 then updates the layers' own weights.

# %%
conv = keras.layers.Conv2D(1, 2, use_bias=False, dtype="float64")
pool = keras.layers.MaxPooling2D(2, dtype="float64")
dense = keras.layers.Dense(2, dtype="float64")
conv.build((1, 5, 5, 1))
dense.build((1, 4))
conv.set_weights([kernel[:, :, None, None]])
dense.set_weights([dense_w.T, dense_b])

x = tf.constant(image[None, :, :, None])
with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    y_k = conv(x)
    p_k = pool(y_k)
    s_k = keras.layers.Flatten(dtype="float64")(keras.activations.sigmoid(p_k))
    z_k = dense(s_k)
grads = tape.gradient(z_k, [s_k, p_k, y_k, x, *conv.trainable_weights, *dense.trainable_weights],
                      output_gradients=tf.constant(delta_z[None]))
ds_k, dp_k, dy_k, dx_k, dk_k, dw_k, db_k = (g.numpy() for g in grads)
lesson.assert_close(z_k.numpy()[0], z, atol=1e-12)
for name, tape_value, hand in [("δs", ds_k[0], delta_s), ("δP", dp_k[0, :, :, 0], delta_p),
                               ("δY", dy_k[0, :, :, 0], delta_y), ("δX", dx_k[0, :, :, 0], delta_x),
                               ("∂L/∂K", dk_k[:, :, 0, 0], d_kernel), ("∂L/∂W", dw_k.T, d_w), ("∂L/∂b", db_k, d_b)]:
    print(f"{name:6} GradientTape against by hand: largest difference {np.abs(tape_value - hand).max():.1e}")
    lesson.assert_close(tape_value, hand, atol=1e-15)

keras.optimizers.SGD(learning_rate=eta).apply_gradients(
    zip([dk_k, dw_k, db_k], [*conv.trainable_weights, *dense.trainable_weights], strict=True))
lesson.assert_close(conv.get_weights()[0][:, :, 0, 0], kernel_new, atol=1e-15)
lesson.assert_close(dense.get_weights()[0].T, dense_w_new, atol=1e-15)
lesson.assert_close(dense.get_weights()[1], dense_b_new, atol=1e-15)

# %% [markdown]
# **Pool first or sigmoid first?** The sigmoid only ever increases, so the largest of four values stays the
# largest after it: $\max(\sigma(Y)) = \sigma(\max Y)$. A network that applies the sigmoid before pooling
# (conv → sigmoid → pool → flatten → dense, LeNet's order) computes the same $z$, routes the same gradients to the
# same pixels, and so gives the same $\delta X$ and $\partial L / \partial K$:

# %%
conv.set_weights([kernel[:, :, None, None]])  # the weights before the SGD step above
dense.set_weights([dense_w.T, dense_b])
with tf.GradientTape() as tape:
    tape.watch(x)
    z_swapped = dense(keras.layers.Flatten(dtype="float64")(pool(keras.activations.sigmoid(conv(x)))))
dx_swapped, dk_swapped = tape.gradient(z_swapped, [x, conv.trainable_weights[0]],
                                       output_gradients=tf.constant(delta_z[None]))
lesson.assert_close(z_swapped.numpy()[0], z, atol=1e-12)
lesson.assert_close(dx_swapped.numpy()[0, :, :, 0], delta_x, atol=1e-12)
lesson.assert_close(dk_swapped.numpy()[:, :, 0, 0], d_kernel, atol=1e-12)
print("conv → sigmoid → pool: same z, δX and ∂L/∂K")

# %% [markdown]
# ## The gradient check
#
# `models.gradcheck.check_layer` is how the lab proves a scratch layer right: it copies the built-in twin's
# weights into ours, feeds both the same input and a *random* upstream gradient (so no lucky cancellation hides
# a wrong term), and compares outputs, input gradients and weight gradients in float32; then it checks a few
# entries against float64 central differences, $\frac{L(w + h) - L(w - h)}{2h}$, which need no formula at all.
# Here each scratch layer of this network, on this example's own activations:

# %%
table = (
    check_layer(ScratchConv2D(1, 2, use_bias=False), reference=keras.layers.Conv2D(1, 2, use_bias=False),
                x=image[None, :, :, None])
    + check_layer(ScratchMaxPool2D(2), reference=keras.layers.MaxPooling2D(2), x=y[None, :, :, None])
    + check_layer(ScratchActivation("sigmoid"), reference=keras.layers.Activation("sigmoid"), x=p[None, :, :, None])
    + check_layer(ScratchDense(2), reference=keras.layers.Dense(2), x=s[None])
)
display(Markdown(table.markdown()))
assert table.passed, table.markdown()

# %% [markdown]
# The random upstream gradient is the check's strength, so the table above never meets this example's own
# numbers. `outputs_and_grads` is the check's own probe, $L = \sum y \cdot g$: given the worked weights and the
# hand-made upstream gradients ($\delta_Y$ into the convolution, $\delta_z$ into the dense layer), our scratch
# layers hand back exactly the deltas worked out above.

# %%
scratch_conv = ScratchConv2D(1, 2, use_bias=False, dtype="float64")
scratch_dense = ScratchDense(2, dtype="float64")
scratch_conv.build((1, 5, 5, 1))
scratch_dense.build((1, 4))
scratch_conv.set_weights([kernel[:, :, None, None]])
scratch_dense.set_weights([dense_w.T, dense_b])
_, dx_ours, dk_ours = outputs_and_grads(scratch_conv, image[None, :, :, None], delta_y[None, :, :, None])
_, ds_ours, dw_ours, db_ours = outputs_and_grads(scratch_dense, s[None], delta_z[None])
for name, ours, hand in [("δX", dx_ours.numpy()[0, :, :, 0], delta_x), ("∂L/∂K", dk_ours.numpy()[:, :, 0, 0], d_kernel),
                         ("δs", ds_ours.numpy()[0], delta_s), ("∂L/∂W", dw_ours.numpy().T, d_w),
                         ("∂L/∂b", db_ours.numpy(), d_b)]:
    print(f"{name:6} scratch layer against by hand: largest difference {np.abs(ours - hand).max():.1e}")
    lesson.assert_close(ours, hand, atol=1e-15)
lesson.assert_close(db_ours.numpy(), [0.25, -0.15], atol=0)  # the bias's gradient is δz itself

# %% [markdown]
# Next: [3. Pooling and flattening](03_pooling_and_flattening.py): ties, average pooling, overlapping windows
# and the NHWC order, with pictures of where each gradient lands.
