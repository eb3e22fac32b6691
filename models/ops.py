"""The math of the scratch layers: forward passes and hand-derived backward passes, one small function
per formula, with the formula in its docstring.

Every layer mirrors its ``keras.layers`` twin (same arguments, defaults, NHWC layout and
weight shapes, so ``scratch.set_weights(builtin.get_weights())`` works), but the math is
written out with TensorFlow primitives (pad, slices, stack, reshape, transpose, matmul,
elementwise reductions) and the gradients are given explicitly through ``tf.custom_gradient``.
No convolution or pooling kernel of TensorFlow (nor its gradient) is used.

Notation (NHWC): ``x`` is ``(N, H, W, C)``, the window is ``(kh, kw)``, the strides
``(sh, sw)``, the output ``(N, Ho, Wo, F)``; ``K = kh * kw`` window offsets; ``M = N * Ho * Wo``
output positions.

The conv and pooling formulas are written here as they read on paper; :mod:`models.fast` computes
the same formulas faster (stride-phase grids, XLA-compiled pieces, a batched matmul), and the conv
and pool layers run those. The dense layer, flatten, the activations and the loss run as written here.
"""

import functools
import math

import tensorflow as tf

# --------------------------------------------------------------------------- geometry


def same_padding(size, window, stride):
    """TensorFlow 'same' padding along one axis: ``(before, after)``.

    ``total = max((ceil(size / stride) - 1) * stride + window - size, 0)``,
    ``before = total // 2``, the extra pixel goes after (bottom/right).
    """
    total = max((math.ceil(size / stride) - 1) * stride + window - size, 0)
    return total // 2, total - total // 2


def output_size(size, window, stride, padding):
    """Output length along one axis: ``ceil(size / stride)`` for 'same',
    ``(size - window) // stride + 1`` for 'valid'; ``None`` stays ``None``."""
    if size is None:
        return None
    if padding == "same":
        return math.ceil(size / stride)
    return (size - window) // stride + 1


def window_output_hw(input_hw, window, strides, pads):
    """``(Ho, Wo)`` of a window sliding over the padded input: ``(H + pads - k) // s + 1``."""
    return tuple(
        (size + sum(pad) - k) // s + 1 for size, pad, k, s in zip(input_hw, pads, window, strides, strict=True)
    )


def window_pads(height, width, window, strides, padding):
    """Padding of the H and W axes: ``((top, bottom), (left, right))``."""
    if padding == "valid":
        return (0, 0), (0, 0)
    return (
        same_padding(height, window[0], strides[0]),
        same_padding(width, window[1], strides[1]),
    )


# --------------------------------------------------------------------------- window patches


def pad_hw(x, rows, cols, value=0.0):
    """``tf.pad`` of axis 1 (H) by ``rows = (top, bottom)`` and axis 2 (W) by ``cols``;
    returns ``x`` itself when there is nothing to pad."""
    if not any(rows + cols):
        return x
    paddings = [[0, 0], list(rows), list(cols)] + [[0, 0]] * (x.shape.rank - 3)
    return tf.pad(x, paddings, constant_values=value)


def window_patches(x, window, strides, pads, pad_value=0.0):
    """The ``K = kh*kw`` strided views of the padded input, one per window offset.

    ``x (A, H, W, *T)`` -> ``K`` tensors ``(A, Ho, Wo, *T)`` with
    ``patch[a*kw + b][:, i, j] = x_pad[:, i*sh + a, j*sw + b]`` (row-major offsets; axis 0
    and the trailing axes ``T`` ride along, e.g. NHWC ``A = N, T = (C,)``).
    """
    (kh, kw), (sh, sw) = window, strides
    ho, wo = window_output_hw(tuple(x.shape[1:3]), window, strides, pads)
    x_pad = pad_hw(x, *pads, pad_value)
    return [
        x_pad[:, a : a + (ho - 1) * sh + 1 : sh, b : b + (wo - 1) * sw + 1 : sw]
        for a in range(kh)
        for b in range(kw)
    ]


def spread(d, strides):
    """Adjoint of a strided slice: ``d (A, Ho, Wo, *T)`` with ``sh − 1`` zero rows between its rows and
    ``sw − 1`` zero columns between its columns, ``(A, (Ho − 1)·sh + 1, (Wo − 1)·sw + 1, *T)``:
    ``spread[:, i*sh, j*sw] = d[:, i, j]``, zero elsewhere."""
    (sh, sw), (ho, wo), trailing = strides, d.shape[1:3], list(d.shape[3:])
    cells = tf.pad(tf.reshape(d, [-1, ho, 1, wo, 1, *trailing]),  # each value in the corner of an sh x sw cell
                   [[0, 0], [0, 0], [0, sh - 1], [0, 0], [0, sw - 1]] + [[0, 0]] * len(trailing))
    return tf.reshape(cells, [-1, ho * sh, wo * sw, *trailing])[:, : (ho - 1) * sh + 1, : (wo - 1) * sw + 1]


def scatter_patches(dpatches, input_hw, window, strides, pads):
    """Adjoint of :func:`window_patches`: scatter-add ``K`` patch gradients onto the input.

    ``K x (A, Ho, Wo, *T)`` -> ``dx (A, H, W, *T)`` with
    ``dx_pad[:, i*sh + a, j*sw + b] += dpatch[a*kw + b][:, i, j]``: each patch :func:`spread` to the
    stride and shifted by its offset ``(a, b)``, the ``K`` of them summed, then the padding cropped.
    """
    (kh, kw), ((top, bottom), (left, right)) = window, pads
    padded_h, padded_w = input_hw[0] + top + bottom, input_hw[1] + left + right
    spreads = [spread(dpatch, strides) for dpatch in dpatches]
    span_h, span_w = spreads[0].shape[1:3]
    dx_pad = tf.add_n([
        pad_hw(spreads[a * kw + b], (a, padded_h - a - span_h), (b, padded_w - b - span_w))
        for a in range(kh)
        for b in range(kw)
    ])
    return dx_pad[:, top : top + input_hw[0], left : left + input_hw[1]]


# --------------------------------------------------------------------------- convolution


def im2col(x, window, strides, pads):
    """``x (N, H, W, C)`` -> ``X_col (M, K*C)``, every window as one row:
    ``X_col[(n*Ho + i)*Wo + j, (a*kw + b)*C + c] = x_pad[n, i*sh + a, j*sw + b, c]``;
    columns in the ``(a, b, c)`` order of a ``(kh, kw, C, F)`` kernel reshaped to ``W (K*C, F)``."""
    patches = tf.stack(window_patches(x, window, strides, pads), axis=3)  # (N, Ho, Wo, K, C)
    return tf.reshape(patches, [-1, patches.shape[3] * patches.shape[4]])


def col2im(dx_col, input_shape, window, strides, pads):
    """Adjoint of :func:`im2col`: ``dX_col (M, K*C)`` -> ``dx (N, H, W, C)``, every row
    scatter-added back onto the window it came from."""
    h, w, channels = input_shape[1:]
    ho, wo = window_output_hw((h, w), window, strides, pads)
    blocks = tf.unstack(tf.reshape(dx_col, [-1, ho, wo, window[0] * window[1], channels]), axis=3)
    return scatter_patches(blocks, (h, w), window, strides, pads)


def bias_activation(z, *bias, activation, shape):
    """``Y = act(Z + b)`` reshaped to ``(N, *shape)``; ``Z (M, F)``; ``bias`` ``(F,)`` or absent;
    ``activation`` a name of :data:`ELEMENTWISE` or ``None``."""
    y = tf.reshape(z + bias[0] if bias else z, [-1, *shape])
    return y if activation is None else ELEMENTWISE[activation][0](y)


def activation_grad(dy, y, *, activation):
    """``dZ = act'(dY)`` as ``(M, F)`` rows and ``db = Σ dZ``: the way back through
    :func:`bias_activation` (``act'`` from the output ``y``)."""
    dz = dy if activation is None else ELEMENTWISE[activation][1](dy, y)
    dz = tf.reshape(dz, [-1, dz.shape[-1]])
    return dz, tf.reduce_sum(dz, axis=0)


def conv2d_forward(x, kernel, bias, strides, pads, activation=None):
    """``Y = act(X_col · W + b)``.

    ``x (N, H, W, C)`` -> ``X_col (M, K*C)``; ``kernel (kh, kw, C, F)`` -> ``W (K*C, F)``;
    ``Y (N, Ho, Wo, F)``; ``bias`` may be ``None``. Returns ``(Y, X_col)`` (kept for the backward).
    """
    window, filters = tuple(kernel.shape[:2]), kernel.shape[3]
    x_col = im2col(x, window, strides, pads)
    z = tf.matmul(x_col, tf.reshape(kernel, [-1, filters]))  # (M, F)
    out_shape = (*window_output_hw(tuple(x.shape[1:3]), window, strides, pads), filters)
    bias = () if bias is None else (bias,)
    return bias_activation(z, *bias, activation=activation, shape=out_shape), x_col


def conv2d_backward(dy, y, x_col, kernel, input_shape, strides, pads, activation=None):
    """``dZ = act'(dY)``, ``db = Σ dZ``, ``dW = X_colᵀ · dZ``, ``dX = col2im(dZ · Wᵀ)``.

    ``dy (N, Ho, Wo, F)`` and the output ``y`` -> ``dZ (M, F)``; returns ``dx (N, H, W, C)``,
    ``dw (kh, kw, C, F)`` and ``db (F,)``.
    """
    w = tf.reshape(kernel, [-1, kernel.shape[3]])  # (K*C, F)
    dz, db = activation_grad(dy, y, activation=activation)
    dw = tf.reshape(tf.matmul(x_col, dz, transpose_a=True), tf.shape(kernel))
    dx_col = tf.matmul(dz, w, transpose_b=True)  # (M, K*C)
    dx = col2im(dx_col, input_shape, tuple(kernel.shape[:2]), strides, pads)
    return dx, dw, db


# --------------------------------------------------------------------------- pooling


def max_pool_forward(x, window, strides, pads):
    """``Y = max_k patch_k`` over the window patches of ``x`` padded with −∞, ``(N, Ho, Wo, C)``."""
    return functools.reduce(tf.maximum, window_patches(x, window, strides, pads, float("-inf")))


def first_max_masks(patches, y):
    """``mask_k = (patch_k == Y) & ¬(patch_j == Y for any j < k)``: true only at the FIRST
    maximum of each window in row-major order (TensorFlow's tie rule)."""
    masks, taken = [], None
    for patch in patches:
        is_max = tf.equal(patch, y)
        masks.append(is_max if taken is None else tf.logical_and(is_max, tf.logical_not(taken)))
        taken = is_max if taken is None else tf.logical_or(taken, is_max)
    return masks


def max_pool_backward(dy, x, y, window, strides, pads):
    """``dX = scatter(mask_k · dY)``: each ``dY`` goes to the first maximum of its window;
    overlapping windows add up. ``dy (N, Ho, Wo, C)`` -> ``dx (N, H, W, C)``."""
    patches = window_patches(x, window, strides, pads, float("-inf"))
    zeros = tf.zeros_like(dy)
    dpatches = [tf.where(mask, dy, zeros) for mask in first_max_masks(patches, y)]
    return scatter_patches(dpatches, tuple(x.shape[1:3]), window, strides, pads)


def avg_pool_counts(input_hw, window, strides, pads):
    """Number of real (unpadded) elements in each window, ``(Ho, Wo, 1)``.

    Separable: ``count[i, j] = rows(i) * cols(j)`` with
    ``rows(i) = min(i*sh - top + kh, H) - max(i*sh - top, 0)``.
    """
    out_hw = window_output_hw(input_hw, window, strides, pads)
    rows, cols = (
        [min(i * s - pad[0] + k, size) - max(i * s - pad[0], 0) for i in range(n_out)]
        for size, pad, k, s, n_out in zip(input_hw, pads, window, strides, out_hw, strict=True)
    )
    return tf.constant([[[r * c] for c in cols] for r in rows], tf.float32)


def avg_pool_forward(x, window, strides, pads):
    """``Y = Σ_k patch_k / count`` (count = real elements, padding excluded)."""
    counts = tf.cast(avg_pool_counts(tuple(x.shape[1:3]), window, strides, pads), x.dtype)
    return tf.add_n(window_patches(x, window, strides, pads)) / counts


def avg_pool_backward(dy, input_hw, window, strides, pads):
    """``dX = scatter(dY / count)`` for every offset: each ``dY`` is spread evenly over the
    real elements of its window (padded ones are cropped off)."""
    counts = tf.cast(avg_pool_counts(input_hw, window, strides, pads), dy.dtype)
    share = dy / counts
    return scatter_patches([share] * (window[0] * window[1]), input_hw, window, strides, pads)


# --------------------------------------------------------------------------- flatten / dense


@tf.custom_gradient
def flatten(x):
    """``(N, d1, d2, …) -> (N, d1*d2*…)``; the gradient reshapes back."""

    def grad(dy):
        return tf.reshape(dy, tf.shape(x))

    return tf.reshape(x, [tf.shape(x)[0], -1]), grad


def dense_forward(x, kernel, bias, activation=None):
    """``Y = act(x · W + b)``; ``x (N, in)``, ``kernel (in, units)`` -> ``Y (N, units)``."""
    bias = () if bias is None else (bias,)
    return bias_activation(tf.matmul(x, kernel), *bias, activation=activation, shape=(kernel.shape[1],))


def dense_backward(dy, y, x, kernel, activation=None):
    """``dZ = act'(dY)``, ``dX = dZ · Wᵀ``, ``dW = xᵀ · dZ``, ``db = Σ dZ``."""
    dz, db = activation_grad(dy, y, activation=activation)
    dx = tf.matmul(dz, kernel, transpose_b=True)
    dw = tf.matmul(x, dz, transpose_a=True)
    return dx, dw, db


def dense(x, kernel, bias, activation=None):
    """Fully connected layer with the gradient of :func:`dense_backward`; ``bias`` may be ``None``;
    ``activation``, a name of :data:`ELEMENTWISE` or ``None``, is applied inside."""

    @tf.custom_gradient
    def _dense(x, kernel, *bias):
        y = dense_forward(x, kernel, bias[0] if bias else None, activation)

        def grad(dy):
            dx, dw, db = dense_backward(dy, y, x, kernel, activation)
            return (dx, dw, db) if bias else (dx, dw)

        return y, grad

    return _dense(x, kernel) if bias is None else _dense(x, kernel, bias)


# --------------------------------------------------------------------------- batch normalization
# Statistics per channel (the last axis) over every other axis: ``m`` values each, e.g. ``m = N·H·W``
# for NHWC conv outputs, ``m = N`` for dense outputs. ``γ`` (scale) and ``β`` (offset) may be absent.
# ``total`` sums a per-channel tensor over the replicas whose batches share the statistics (Keras's
# ``synchronized=True``: an all-reduce); ``None``: this batch alone.


def channel_axes(x):
    """Every axis of ``x`` but the last: those a per-channel statistic reduces over."""
    return list(range(x.shape.rank - 1))


def channel_sum(x, total=None):
    """``Σ x`` per channel over every other axis (and the replicas, with ``total``)."""
    s = tf.reduce_sum(x, channel_axes(x))
    return s if total is None else total(s)


def channel_count(x, total=None):
    """``m``: the values per channel, ``size(x) / channels`` (summed over the replicas, with ``total``)."""
    m = tf.cast(tf.size(x) // tf.shape(x)[-1], x.dtype)
    return m if total is None else total(m)


def batch_moments(x, total=None):
    """``μ = (1/m) Σ x``, ``σ² = (1/m) Σ (x − μ)²`` per channel: the biased variance, which Keras both
    normalizes with and averages into the moving variance."""
    m = channel_count(x, total)
    mean = channel_sum(x, total) / m
    return mean, channel_sum(tf.square(x - mean), total) / m


def moving_average(moving, batch, momentum):
    """``moving · momentum + batch · (1 − momentum)``: Keras's update of a moving statistic."""
    return moving * momentum + batch * (1.0 - momentum)


def batch_norm_forward(x, mean, variance, gamma, beta, epsilon):
    """``x̂ = (x − μ) · r`` with ``r = 1 / √(σ² + ε)``, ``y = γ · x̂ + β``; returns ``(y, x̂, r)``."""
    r = tf.math.rsqrt(variance + epsilon)
    x_hat = (x - mean) * r
    y = x_hat if gamma is None else x_hat * gamma
    return (y if beta is None else y + beta), x_hat, r


def batch_norm_backward(dy, x_hat, r, gamma, total=None):
    """Training mode (``μ``, ``σ²`` of the batch, so they depend on ``x``):
    ``dβ = Σ dy``, ``dγ = Σ dy · x̂``, ``dx = γ · r · (dy − dβ / m − x̂ · dγ / m)``. With ``total``, the
    sums in ``dx`` and ``m`` run over every replica's batch; ``dγ``, ``dβ`` stay this replica's (the
    optimizer sums the replicas' weight gradients)."""
    dbeta, dgamma = channel_sum(dy), channel_sum(dy * x_hat)
    m = channel_count(dy, total)
    dbeta_all, dgamma_all = (dbeta, dgamma) if total is None else (total(dbeta), total(dgamma))
    scale = r if gamma is None else gamma * r
    return scale * (dy - dbeta_all / m - x_hat * (dgamma_all / m)), dgamma, dbeta


def batch_norm_inference_backward(dy, x_hat, r, gamma):
    """Inference mode (``μ``, ``σ²`` the moving statistics, inputs of their own): ``dx = γ · r · dy``,
    ``dγ = Σ dy · x̂``, ``dβ = Σ dy``, ``dμ = −Σ γ · r · dy``, ``dσ² = −½ Σ γ · r² · dy · x̂``."""
    dx = dy * (r if gamma is None else gamma * r)
    dmean, dvariance = -channel_sum(dx), -0.5 * r * channel_sum(dx * x_hat)
    return dx, channel_sum(dy * x_hat), channel_sum(dy), dmean, dvariance


def batch_norm(x, mean, variance, gamma, beta, epsilon, training, total=None):
    """Batch normalization with a hand-derived gradient; ``gamma``/``beta`` may be ``None``.

    ``training``: ``mean``/``variance`` are ``x``'s own :func:`batch_moments` (with the same ``total``;
    of a stopped gradient, so that the layer can also average them into its moving statistics): the
    gradient is that of :func:`batch_norm_backward`, through the statistics, and none for them.
    Otherwise they are the moving statistics, inputs of their own: :func:`batch_norm_inference_backward`.
    """
    scale, center = gamma is not None, beta is not None

    @tf.custom_gradient
    def _batch_norm(x, mean, variance, *params):
        gamma, beta = (params[0] if scale else None), (params[-1] if center else None)
        y, x_hat, r = batch_norm_forward(x, mean, variance, gamma, beta, epsilon)

        def grad(dy):
            if training:
                (dx, dgamma, dbeta), dmean, dvariance = batch_norm_backward(dy, x_hat, r, gamma, total), None, None
            else:
                dx, dgamma, dbeta, dmean, dvariance = batch_norm_inference_backward(dy, x_hat, r, gamma)
            return (dx, dmean, dvariance, *((dgamma,) if scale else ()), *((dbeta,) if center else ()))

        return y, grad

    return _batch_norm(x, mean, variance, *(p for p in (gamma, beta) if p is not None))


# --------------------------------------------------------------------------- dropout


def dropout_mask(uniform, rate):
    """``keep = (u ≥ rate)`` for ``u`` uniform on [0, 1): each unit kept with probability ``1 − rate``."""
    return uniform >= rate


def dropout(x, keep, rate):
    """Inverted dropout: ``y = x · keep / (1 − rate)`` (so that ``E[y] = x``), with the gradient
    ``dx = dy · keep / (1 − rate)``: the same mask both ways. ``keep`` broadcasts against ``x``."""
    scale = tf.constant(1 / (1 - rate), x.dtype)
    zero = tf.zeros((), x.dtype)

    @tf.custom_gradient
    def _dropout(x):
        def grad(dy):
            return tf.where(keep, dy * scale, zero)

        return tf.where(keep, x * scale, zero), grad

    return _dropout(x)


# --------------------------------------------------------------------------- global average pooling


def global_avg_pool(x, keepdims=False):
    """``y[n, c] = (1 / (H·W)) Σ_{i,j} x[n, i, j, c]``, with the gradient
    ``dx[n, i, j, c] = dy[n, c] / (H·W)`` (every position's equal share). ``keepdims``: ``y (N, 1, 1, C)``."""

    @tf.custom_gradient
    def _global_avg_pool(x):
        hw = tf.cast(tf.shape(x)[1] * tf.shape(x)[2], x.dtype)

        def grad(dy):
            return tf.broadcast_to(tf.reshape(dy, [-1, 1, 1, x.shape[-1]]) / hw, tf.shape(x))

        return tf.reduce_mean(x, [1, 2], keepdims=keepdims), grad

    return _global_avg_pool(x)


# --------------------------------------------------------------------------- activations
# Each backward is a function of the upstream gradient and the activation's own output.


def with_output_gradient(forward, backward):
    """The op ``y = forward(x)`` whose gradient is ``backward(dy, y)`` (``tf.custom_gradient``)."""

    @tf.custom_gradient
    def op(x):
        y = forward(x)

        def grad(dy):
            return backward(dy, y)

        return y, grad

    op.__name__ = forward.__name__.removesuffix("_forward")
    return op


def relu_forward(x):
    """``max(x, 0)``."""
    return tf.maximum(x, tf.zeros((), x.dtype))  # a broadcast scalar: no zero tensor allocated


def relu_backward(dy, y):
    """``dX = dY · [y > 0]`` (``y > 0`` iff ``x > 0``): the slope at 0 is taken as 0, as TensorFlow's
    ``ReluGrad`` does."""
    return tf.where(y > 0, dy, tf.zeros((), dy.dtype))


def sigmoid_forward(x):
    """``s = 1 / (1 + e^{−x})``; ``e^{−x}`` overflowing to ∞ gives ``s = 0``, never NaN."""
    return 1 / (1 + tf.exp(-x))


def sigmoid_backward(dy, s):
    """``dX = dY · s · (1 − s)``."""
    return dy * s * (1 - s)


def tanh_forward(x):
    """``t = tanh x`` (TensorFlow's elementwise ``tanh``; its gradient is never used)."""
    return tf.tanh(x)


def tanh_backward(dy, t):
    """``dX = dY · (1 − t²)``."""
    return dy * (1 - t * t)


def softmax_forward(x):
    """``p = e^{x − max x} / Σ e^{x − max x}`` along the last axis: the shift leaves ``p`` unchanged
    and keeps every exponent ≤ 0 (no overflow for any logits)."""
    e = tf.exp(x - tf.reduce_max(x, axis=-1, keepdims=True))
    return e / tf.reduce_sum(e, axis=-1, keepdims=True)


def softmax_backward(dy, p):
    """Jacobian-vector product without the Jacobian: ``∂p_i/∂x_j = p_i (δ_ij − p_j)``, so
    ``dX = p ⊙ (dY − Σ_i dY_i p_i)`` along the last axis."""
    return p * (dy - tf.reduce_sum(dy * p, axis=-1, keepdims=True))


# The activations that act on each element alone: a conv or dense layer applies them inside its own
# forward and backward passes, with its bias (:func:`bias_activation`, :func:`activation_grad`).
ELEMENTWISE = {
    "relu": (relu_forward, relu_backward),
    "sigmoid": (sigmoid_forward, sigmoid_backward),
    "tanh": (tanh_forward, tanh_backward),
}
relu, sigmoid, tanh = (with_output_gradient(*ELEMENTWISE[name]) for name in ("relu", "sigmoid", "tanh"))
_softmax = with_output_gradient(softmax_forward, softmax_backward)


def softmax(x):
    """Softmax over the last axis with the gradient of :func:`softmax_backward`. The output carries its
    logits (``_keras_logits``, Keras's own convention), which the cross-entropy losses use."""
    p = _softmax(x)
    try:
        p._keras_logits = x
    except AttributeError:  # a C-type tensor that takes no attributes: the loss uses p itself
        pass
    return p


ACTIVATIONS = {"relu": relu, "sigmoid": sigmoid, "tanh": tanh, "softmax": softmax}


def elementwise_name(activation):
    """The :data:`ELEMENTWISE` name of a scratch activation, else ``None`` (none, softmax, your own)."""
    return next((name for name in ELEMENTWISE if ACTIVATIONS[name] is activation), None)


# --------------------------------------------------------------------------- loss


def log_sum_exp(z):
    """``log Σ_j e^{z_j} = m + log Σ_j e^{z_j − m}``, ``m = max z`` (last axis, kept): no overflow."""
    m = tf.reduce_max(z, axis=-1, keepdims=True)
    return m + tf.math.log(tf.reduce_sum(tf.exp(z - m), axis=-1, keepdims=True))


def cross_entropy_forward(labels, logits):
    """``L = (1/N) Σ_n (logsumexp(z_n) − z_{n, y_n})`` = mean of ``−log softmax(z)_{y}``."""
    picked = tf.gather(logits, labels, axis=1, batch_dims=1)[:, None]
    return tf.reduce_mean(log_sum_exp(logits) - picked)


def cross_entropy_backward(dl, labels, logits):
    """``dZ = dL · (p − y) / N`` with ``p = softmax(z)`` and ``y`` the one-hot labels."""
    p = softmax_forward(logits)
    y = tf.one_hot(labels, tf.shape(logits)[-1], dtype=logits.dtype)
    return dl * (p - y) / tf.cast(tf.shape(logits)[0], logits.dtype)


@tf.custom_gradient
def sparse_softmax_cross_entropy(labels, logits):
    """Mean softmax cross-entropy of integer ``labels (N,)`` against ``logits (N, C)``, fused: the
    gradient of :func:`cross_entropy_backward` (none for the labels)."""

    def grad(dl):
        return None, cross_entropy_backward(dl, labels, logits)

    return cross_entropy_forward(labels, logits), grad
