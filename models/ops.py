"""The math of the scratch layers: forward passes and hand-derived backward passes.

Every layer mirrors its ``keras.layers`` twin (same arguments, defaults, NHWC layout and
weight shapes, so ``scratch.set_weights(builtin.get_weights())`` works), but the math is
written out with TensorFlow primitives (pad, slices, stack, reshape, transpose, matmul,
elementwise reductions) and the gradients are given explicitly through ``tf.custom_gradient``.
No convolution or pooling kernel of TensorFlow (nor its gradient) is used.

Notation (NHWC): ``x`` is ``(N, H, W, C)``, the window is ``(kh, kw)``, the strides
``(sh, sw)``, the output ``(N, Ho, Wo, F)``; ``K = kh * kw`` window offsets.

Two layout choices keep this close to the oneDNN built-ins on CPU (see
``benchmarks/conv_variants.py``): window patches are unit-step slices of a stride-phase view
of the input (TensorFlow's strided slices are slow), and the conv columns are built transposed,
``X_colᵀ (K*C, N*Ho*Wo)``, by stacking patches of channel planes; concatenating K narrow
NHWC patches on the channel axis costs more than the whole built-in convolution when C = 1.
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


def phase_grid_size(size, pads, window, stride):
    """Rows (or columns) ``hs`` of the stride-phase grid, with ``hs * s >= H + pads`` and
    ``hs >= Ho + (k - 1) // s``, so that every window offset is a plain slice of it."""
    padded = size + sum(pads)
    out = (padded - window) // stride + 1
    return max(out + (window - 1) // stride, math.ceil(padded / stride))


def window_patches(x, window, strides, pads, pad_value=0.0):
    """The ``K = kh*kw`` strided views of the padded input, one per window offset.

    ``x (A, H, W, *T)`` -> ``K`` tensors ``(A, Ho, Wo, *T)`` with
    ``patch[a*kw + b][:, i, j] = x_pad[:, i*sh + a, j*sw + b]`` (row-major offsets; axis 0
    and the trailing axes ``T`` ride along, e.g. NHWC ``A = N, T = (C,)``).
    Strided slicing is slow on CPU, so the padded input is viewed as a stride-phase grid
    ``(A, Hs, sh, Ws, sw, *T)`` (a free reshape) and every patch is a unit-step slice:
    ``patch[a*kw + b] = grid[:, a//sh : a//sh + Ho, a%sh, b//sw : b//sw + Wo, b%sw]``.
    """
    (kh, kw), (sh, sw) = window, strides
    (top, _), (left, _) = pads
    h, w, trailing = x.shape[1], x.shape[2], x.shape[3:]
    hs = phase_grid_size(h, pads[0], kh, sh)
    ws = phase_grid_size(w, pads[1], kw, sw)
    ho, wo = window_output_hw((h, w), window, strides, pads)
    x = pad_hw(x, (top, hs * sh - h - top), (left, ws * sw - w - left), pad_value)
    grid = tf.reshape(x, [-1, hs, sh, ws, sw, *trailing])
    return [
        grid[:, a // sh : a // sh + ho, a % sh, b // sw : b // sw + wo, b % sw, ...]
        for a in range(kh)
        for b in range(kw)
    ]


def phase_scatter(dpatches, phase, window, strides, grid_hw):
    """Scatter-add of the patches of one stride phase ``(p, q)`` onto its sub-grid.

    ``dpatch[a*kw + b] (A, Ho, Wo, *T)`` with ``a % sh = p``, ``b % sw = q`` lands at rows
    ``a//sh + i`` and columns ``b//sw + j`` of the ``(A, Hs, Ws, *T)`` sub-grid: a sum of
    zero-padded shifted blocks, first along W within a kernel row, then along H.
    """
    (p, q), (kh, kw), (sh, sw), (hs, ws) = phase, window, strides, grid_hw
    ho, wo = dpatches[0].shape[1:3]
    rows = [
        tf.add_n([pad_hw(dpatches[a * kw + b], (0, 0), (b // sw, ws - b // sw - wo)) for b in range(q, kw, sw)])
        for a in range(p, kh, sh)
    ]
    return tf.add_n(
        [pad_hw(row, (a // sh, hs - a // sh - ho), (0, 0)) for a, row in zip(range(p, kh, sh), rows, strict=True)]
    )


def scatter_patches(dpatches, input_hw, window, strides, pads):
    """Adjoint of :func:`window_patches`: scatter-add ``K`` patch gradients onto the input.

    ``K x (A, Ho, Wo, *T)`` -> ``dx (A, H, W, *T)`` with
    ``dx_pad[:, i*sh + a, j*sw + b] += dpatch[a*kw + b][:, i, j]``, then the padding cropped.
    Inside one stride phase ``(a % sh, b % sw)`` the targets form a dense sub-grid
    (:func:`phase_scatter`); the ``sh*sw`` phase grids are interleaved by stack + reshape.
    Phases no window offset reaches (kernel smaller than the stride) stay zero.
    """
    (kh, kw), (sh, sw) = window, strides
    (top, _), (left, _) = pads
    trailing = dpatches[0].shape[3:]
    hs = phase_grid_size(input_hw[0], pads[0], kh, sh)
    ws = phase_grid_size(input_hw[1], pads[1], kw, sw)
    empty_shape = [tf.shape(dpatches[0])[0], hs, ws, *trailing]
    phase_rows = [
        tf.stack(  # (A, Hs, Ws, sw, *T)
            [
                phase_scatter(dpatches, (p, q), window, strides, (hs, ws))
                if p < kh and q < kw
                else tf.zeros(tf.stack(empty_shape), dpatches[0].dtype)
                for q in range(sw)
            ],
            axis=3,
        )
        for p in range(sh)
    ]
    grid = tf.stack(phase_rows, axis=2)  # (A, Hs, sh, Ws, sw, *T)
    dx_pad = tf.reshape(grid, [-1, hs * sh, ws * sw, *trailing])
    return dx_pad[:, top : top + input_hw[0], left : left + input_hw[1], ...]


# --------------------------------------------------------------------------- convolution


def im2col(x, window, strides, pads):
    """``x (N, H, W, C)`` -> ``X_colᵀ (K*C, N*Ho*Wo)``, every window as one column:
    ``X_colᵀ[(a*kw + b)*C + c, (n*Ho + i)*Wo + j] = x_pad[n, i*sh + a, j*sw + b, c]``;
    rows in the ``(a, b, c)`` order of a ``(kh, kw, C, F)`` kernel reshaped to ``(K*C, F)``.

    Built transposed, from channel planes ``(C*N, H, W)``: each window offset then is one
    contiguous block of rows, so the K patches are just stacked (no narrow-chunk concat).
    """
    h, w, channels = x.shape[1:]
    planes = tf.reshape(tf.transpose(x, [3, 0, 1, 2]), [-1, h, w])  # (C*N, H, W)
    patches = window_patches(planes, window, strides, pads)  # K x (C*N, Ho, Wo)
    return tf.reshape(tf.stack(patches), [window[0] * window[1] * channels, -1])


def col2im(dx_col_t, input_shape, window, strides, pads):
    """Adjoint of :func:`im2col`: ``dX_colᵀ (K*C, N*Ho*Wo)`` -> ``dx (N, H, W, C)``, every
    column scatter-added back onto the window it came from."""
    h, w, channels = input_shape[1:]
    ho, wo = window_output_hw((h, w), window, strides, pads)
    blocks = tf.unstack(tf.reshape(dx_col_t, [window[0] * window[1], -1, ho, wo]))
    planes = scatter_patches(blocks, (h, w), window, strides, pads)  # (C*N, H, W)
    return tf.transpose(tf.reshape(planes, [channels, -1, h, w]), [1, 2, 3, 0])


def conv2d_forward(x, kernel, bias, strides, pads):
    """``Y = X_col · W + b``, computed as ``(Wᵀ · X_colᵀ)ᵀ``.

    ``x (N, H, W, C)`` -> ``X_colᵀ (K*C, N*Ho*Wo)``; ``kernel (kh, kw, C, F)`` ->
    ``W (K*C, F)``; ``Y (N, Ho, Wo, F)``. Returns ``(Y, X_colᵀ)`` (kept for the backward).
    """
    window, filters = tuple(kernel.shape[:2]), kernel.shape[3]
    x_col_t = im2col(x, window, strides, pads)
    y_t = tf.matmul(tf.reshape(kernel, [-1, filters]), x_col_t, transpose_a=True)  # (F, M)
    y = tf.transpose(y_t)  # (N*Ho*Wo, F)
    if bias is not None:
        y = y + bias
    ho, wo = window_output_hw(tuple(x.shape[1:3]), window, strides, pads)
    return tf.reshape(y, [-1, ho, wo, filters]), x_col_t


def conv2d_backward(dy, x_col_t, kernel, input_shape, strides, pads):
    """``db = Σ dY``, ``dW = X_colᵀ · dY``, ``dX = col2im(dY · Wᵀ)``.

    ``dy (N, Ho, Wo, F)`` -> ``dY (N*Ho*Wo, F)``; returns ``dx (N, H, W, C)``,
    ``dw (kh, kw, C, F)`` and ``db (F,)``. ``dY · Wᵀ`` is formed transposed, as
    ``W · dYᵀ (K*C, N*Ho*Wo)``, the layout :func:`col2im` takes.
    """
    filters = kernel.shape[3]
    dy2 = tf.reshape(dy, [-1, filters])
    w2 = tf.reshape(kernel, [-1, filters])
    db = tf.reduce_sum(dy2, axis=0)
    dw = tf.reshape(tf.matmul(x_col_t, dy2), tf.shape(kernel))
    dx_col_t = tf.matmul(w2, dy2, transpose_b=True)
    dx = col2im(dx_col_t, input_shape, tuple(kernel.shape[:2]), strides, pads)
    return dx, dw, db


def conv2d(x, kernel, bias, strides, padding):
    """2-D cross-correlation ``(N, H, W, C) -> (N, Ho, Wo, F)`` with the gradient of
    :func:`conv2d_backward`. ``bias`` may be ``None``."""
    input_shape = tuple(x.shape)
    pads = window_pads(*input_shape[1:3], tuple(kernel.shape[:2]), strides, padding)

    @tf.custom_gradient
    def _conv(x, kernel, *bias):
        y, x_col_t = conv2d_forward(x, kernel, bias[0] if bias else None, strides, pads)

        def grad(dy):
            dx, dw, db = conv2d_backward(dy, x_col_t, kernel, input_shape, strides, pads)
            return (dx, dw, db) if bias else (dx, dw)

        return y, grad

    return _conv(x, kernel) if bias is None else _conv(x, kernel, bias)


# --------------------------------------------------------------------------- pooling


def max_pool_forward(x, window, strides, pads):
    """``Y = max_k patch_k`` over the window patches of ``x`` padded with −∞.
    Returns ``(Y (N, Ho, Wo, C), patches)``; the patches are kept for the backward pass."""
    patches = window_patches(x, window, strides, pads, float("-inf"))
    return functools.reduce(tf.maximum, patches), patches


def first_max_masks(patches, y):
    """``mask_k = (patch_k == Y) & ¬(patch_j == Y for any j < k)``: true only at the FIRST
    maximum of each window in row-major order (TensorFlow's tie rule)."""
    masks, taken = [], None
    for patch in patches:
        is_max = tf.equal(patch, y)
        masks.append(is_max if taken is None else tf.logical_and(is_max, tf.logical_not(taken)))
        taken = is_max if taken is None else tf.logical_or(taken, is_max)
    return masks


def max_pool_backward(dy, patches, y, input_hw, window, strides, pads):
    """``dX = scatter(mask_k · dY)``: each ``dY`` goes to the first maximum of its window;
    overlapping windows add up. ``dy (N, Ho, Wo, C)`` -> ``dx (N, H, W, C)``."""
    zeros = tf.zeros_like(dy)
    dpatches = [tf.where(mask, dy, zeros) for mask in first_max_masks(patches, y)]
    return scatter_patches(dpatches, input_hw, window, strides, pads)


def max_pool2d(x, window, strides, padding):
    """Max pooling ``(N, H, W, C) -> (N, Ho, Wo, C)`` with the gradient of
    :func:`max_pool_backward`."""
    input_hw = tuple(x.shape[1:3])
    pads = window_pads(*input_hw, window, strides, padding)

    @tf.custom_gradient
    def _max_pool(x):
        y, patches = max_pool_forward(x, window, strides, pads)

        def grad(dy):
            return max_pool_backward(dy, patches, y, input_hw, window, strides, pads)

        return y, grad

    return _max_pool(x)


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


def avg_pool2d(x, window, strides, padding):
    """Average pooling ``(N, H, W, C) -> (N, Ho, Wo, C)`` with the gradient of
    :func:`avg_pool_backward`."""
    input_hw = tuple(x.shape[1:3])
    pads = window_pads(*input_hw, window, strides, padding)

    @tf.custom_gradient
    def _avg_pool(x):
        def grad(dy):
            return avg_pool_backward(dy, input_hw, window, strides, pads)

        return avg_pool_forward(x, window, strides, pads), grad

    return _avg_pool(x)


# --------------------------------------------------------------------------- flatten / dense


@tf.custom_gradient
def flatten(x):
    """``(N, d1, d2, …) -> (N, d1*d2*…)``; the gradient reshapes back."""

    def grad(dy):
        return tf.reshape(dy, tf.shape(x))

    return tf.reshape(x, [tf.shape(x)[0], -1]), grad


def dense_forward(x, kernel, bias):
    """``Y = x · W + b``; ``x (N, in)``, ``kernel (in, units)`` -> ``Y (N, units)``."""
    y = tf.matmul(x, kernel)
    return y if bias is None else y + bias


def dense_backward(dy, x, kernel):
    """``dX = dY · Wᵀ``, ``dW = xᵀ · dY``, ``db = Σ dY``."""
    dx = tf.matmul(dy, kernel, transpose_b=True)
    dw = tf.matmul(x, dy, transpose_a=True)
    return dx, dw, tf.reduce_sum(dy, axis=0)


def dense(x, kernel, bias):
    """Fully connected layer with the gradient of :func:`dense_backward`; ``bias`` may be
    ``None``."""

    @tf.custom_gradient
    def _dense(x, kernel, *bias):
        def grad(dy):
            dx, dw, db = dense_backward(dy, x, kernel)
            return (dx, dw, db) if bias else (dx, dw)

        return dense_forward(x, kernel, bias[0] if bias else None), grad

    return _dense(x, kernel) if bias is None else _dense(x, kernel, bias)


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


relu = with_output_gradient(relu_forward, relu_backward)
sigmoid = with_output_gradient(sigmoid_forward, sigmoid_backward)
tanh = with_output_gradient(tanh_forward, tanh_backward)
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
