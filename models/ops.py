"""The math of the scratch layers: forward passes and hand-derived backward passes.

Every layer mirrors its ``keras.layers`` twin (same arguments, defaults, NHWC layout and
weight shapes, so ``scratch.set_weights(builtin.get_weights())`` works), but the math is
written out with TensorFlow primitives (pad, slices, stack, reshape, transpose, matmul,
elementwise reductions) and the gradients are given explicitly through ``tf.custom_gradient``.
No convolution or pooling kernel of TensorFlow (nor its gradient) is used.

Notation (NHWC): ``x`` is ``(N, H, W, C)``, the window is ``(kh, kw)``, the strides
``(sh, sw)``, the output ``(N, Ho, Wo, F)``; ``K = kh * kw`` window offsets.

Three choices keep this close to the oneDNN built-ins on CPU (``benchmarks/scratch_speed.py``,
``benchmarks/conv_variants.py``): window patches are unit-step slices of a stride-phase view of the
input (TensorFlow's strided slices are slow); the conv columns are built transposed,
``X_colᵀ (K*C, N*Ho*Wo)``, by stacking patches of channel planes (K narrow NHWC patches side by side
cost more than the whole built-in convolution when C = 1); and everything of a layer that is not a
matmul (patches, scatter-adds, bias, activation, max masks) is :func:`compiled` by XLA into a few
loops over memory, while the matmuls stay TensorFlow's.
"""

import functools
import math

import tensorflow as tf

# --------------------------------------------------------------------------- compiled pieces


def compiled(fn):
    """``fn`` compiled by XLA (``tf.function(jit_compile=True)``) when it runs, once per input shape.

    Called as ``fn(*tensors, jit=True, **settings)``: the tensors are positional, the settings (window,
    strides, pads, activation name: hashable Python values) keyword arguments, with one ``tf.function`` per
    settings, so that no function retraces for every layer; ``jit=False`` runs ``fn`` as it is. Taken one by
    one, the slices, pads, stacks and masks of a layer are dozens of TensorFlow kernels, each a pass over
    memory; compiled together they are a few loops. Matmuls stay outside: TensorFlow's (oneDNN on CPU) are
    faster than XLA's.
    """

    @functools.cache
    def for_settings(**settings):
        return tf.function(functools.partial(fn, **settings), jit_compile=True, autograph=False)

    @functools.wraps(fn)
    def call(*tensors, jit=True, **settings):
        return for_settings(**settings)(*tensors) if jit else fn(*tensors, **settings)

    return call


# Compiling costs ~0.05-0.2 CPU-s per piece and input shape: worth it for the batches that come again and
# again (training and evaluation over a dataset, traced with an unknown batch size, or batches of 32 images
# and more), not for a one-off call on a few images (a gradient check, one image's feature maps, the demo
# page), which runs the same functions as TensorFlow ops.
COMPILE_FROM_BATCH = 32


def worth_compiling(x):
    """Whether a layer's pieces are :func:`compiled` for the batch ``x``: see ``COMPILE_FROM_BATCH``."""
    return x.shape[0] is None or x.shape[0] >= COMPILE_FROM_BATCH


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


def phase_grid(x, window, strides, pads, pad_value=0.0):
    """The padded input ``x (A, H, W, *T)`` viewed as a stride-phase grid ``(A, Hs, sh, Ws, sw, *T)``
    (a free reshape), in which every window offset is a unit-step slice (strided slices are slow on
    CPU): ``x_pad[:, i*sh + a, j*sw + b] = grid[:, i + a//sh, a%sh, j + b//sw, b%sw]``."""
    (kh, kw), (sh, sw) = window, strides
    (top, _), (left, _) = pads
    h, w = x.shape[1:3]
    hs = phase_grid_size(h, pads[0], kh, sh)
    ws = phase_grid_size(w, pads[1], kw, sw)
    x = pad_hw(x, (top, hs * sh - h - top), (left, ws * sw - w - left), pad_value)
    return tf.reshape(x, [-1, hs, sh, ws, sw, *x.shape[3:]])


def window_patches(x, window, strides, pads, pad_value=0.0):
    """The ``K = kh*kw`` strided views of the padded input, one per window offset.

    ``x (A, H, W, *T)`` -> ``K`` tensors ``(A, Ho, Wo, *T)`` with
    ``patch[a*kw + b][:, i, j] = x_pad[:, i*sh + a, j*sw + b]`` (row-major offsets; axis 0
    and the trailing axes ``T`` ride along, e.g. NHWC ``A = N, T = (C,)``), slices of
    :func:`phase_grid`: ``patch[a*kw + b] = grid[:, a//sh : a//sh + Ho, a%sh, b//sw : b//sw + Wo, b%sw]``.
    """
    (kh, kw), (sh, sw) = window, strides
    ho, wo = window_output_hw(tuple(x.shape[1:3]), window, strides, pads)
    grid = phase_grid(x, window, strides, pads, pad_value)
    return [
        grid[:, a // sh : a // sh + ho, a % sh, b // sw : b // sw + wo, b % sw, ...]
        for a in range(kh)
        for b in range(kw)
    ]


def stacked_window_patches(x, window, strides, pads):
    """The patches of :func:`window_patches` as one tensor ``(kh, kw, A, Ho, Wo, *T)``, stacked in two
    steps: the ``kw`` column offsets of whole rows, then the ``kh`` row offsets of that stack (compiled,
    two short stacks of slices run ~2x faster than one stack of ``K``)."""
    (kh, kw), (sh, sw) = window, strides
    ho, wo = window_output_hw(tuple(x.shape[1:3]), window, strides, pads)
    grid = phase_grid(x, window, strides, pads)
    # (kw, A, Hs, sh, Wo, *T): every column offset of whole rows
    columns = tf.stack([grid[:, :, :, b // sw : b // sw + wo, b % sw, ...] for b in range(kw)])
    return tf.stack([columns[:, :, a // sh : a // sh + ho, a % sh, ...] for a in range(kh)])


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


@compiled
def im2col(x, *, window, strides, pads):
    """``x (N, H, W, C)`` -> ``X_colᵀ (K*C, N*Ho*Wo)``, every window as one column:
    ``X_colᵀ[(a*kw + b)*C + c, (n*Ho + i)*Wo + j] = x_pad[n, i*sh + a, j*sw + b, c]``;
    rows in the ``(a, b, c)`` order of a ``(kh, kw, C, F)`` kernel reshaped to ``(K*C, F)``.

    Built transposed, from channel planes ``(C*N, H, W)``: each window offset then is one
    contiguous block of rows, so the K patches are just stacked (no narrow-chunk concat).
    """
    h, w, channels = x.shape[1:]
    planes = tf.reshape(tf.transpose(x, [3, 0, 1, 2]), [-1, h, w])  # (C*N, H, W)
    patches = stacked_window_patches(planes, window, strides, pads)  # (kh, kw, C*N, Ho, Wo)
    return tf.reshape(patches, [window[0] * window[1] * channels, -1])


@compiled
def col2im(dx_col, *, input_shape, window, strides, pads):
    """Adjoint of :func:`im2col`: ``dX_col (N*Ho*Wo, K*C)`` -> ``dx (N, H, W, C)``, every row
    scatter-added back onto the window it came from (``dX_col`` untransposed: compiled, its NHWC
    blocks scatter faster than channel planes would)."""
    h, w, channels = input_shape[1:]
    ho, wo = window_output_hw((h, w), window, strides, pads)
    blocks = tf.unstack(tf.reshape(dx_col, [-1, ho, wo, window[0] * window[1], channels]), axis=3)
    return scatter_patches(blocks, (h, w), window, strides, pads)


def bias_activation(z, *bias, activation, shape, transposed=False):
    """``Y = act(Z + b)`` reshaped to ``(N, *shape)``; ``Z (M, F)``, or ``(F, M)`` with ``transposed``; ``bias``
    ``(F,)`` or absent; ``activation`` a name of :data:`ELEMENTWISE` or ``None``. Compiled, one loop."""
    z = tf.transpose(z) if transposed else z
    y = tf.reshape(z + bias[0] if bias else z, [-1, *shape])
    return y if activation is None else ELEMENTWISE[activation][0](y)


def activation_grad(dy, y, *, activation):
    """``dZ = act'(dY)`` as ``(M, F)`` rows and ``db = Σ dZ``: the way back through
    :func:`bias_activation` (``act'`` from the output ``y``)."""
    dz = dy if activation is None else ELEMENTWISE[activation][1](dy, y)
    dz = tf.reshape(dz, [-1, dz.shape[-1]])
    return dz, tf.reduce_sum(dz, axis=0)


# Compiled for the convolutions, whose outputs are large; a dense layer's are small enough that XLA's
# launch costs more than it saves (dense 256 -> 120, forward + backward: 0.52 against 0.36 CPU-ms).
conv_bias_activation = compiled(bias_activation)
conv_activation_grad = compiled(activation_grad)


def conv2d_forward(x, kernel, bias, strides, pads, activation=None, jit=False):
    """``Y = act(X_col · W + b)``, computed as ``act((Wᵀ · X_colᵀ)ᵀ + b)``.

    ``x (N, H, W, C)`` -> ``X_colᵀ (K*C, N*Ho*Wo)``; ``kernel (kh, kw, C, F)`` ->
    ``W (K*C, F)``; ``Y (N, Ho, Wo, F)``. Returns ``(Y, X_colᵀ)`` (kept for the backward). With ``jit``,
    the pieces around the matmul are :func:`compiled`.
    """
    window, filters = tuple(kernel.shape[:2]), kernel.shape[3]
    x_col_t = im2col(x, jit=jit, window=window, strides=strides, pads=pads)
    z_t = tf.matmul(tf.reshape(kernel, [-1, filters]), x_col_t, transpose_a=True)  # (F, M)
    out_shape = (*window_output_hw(tuple(x.shape[1:3]), window, strides, pads), filters)
    bias = () if bias is None else (bias,)
    y = conv_bias_activation(z_t, *bias, jit=jit, activation=activation, shape=out_shape, transposed=True)
    return y, x_col_t


def conv2d_backward(dy, y, x_col_t, kernel, input_shape, strides, pads, activation=None, jit=False):
    """``dZ = act'(dY)``, ``db = Σ dZ``, ``dW = X_colᵀ · dZ``, ``dX = col2im(dZ · Wᵀ)``.

    ``dy (N, Ho, Wo, F)`` and the output ``y`` -> ``dZ (N*Ho*Wo, F)``; returns ``dx (N, H, W, C)``,
    ``dw (kh, kw, C, F)`` and ``db (F,)``. With ``jit``, the pieces around the matmuls are :func:`compiled`.
    """
    filters = kernel.shape[3]
    dz, db = conv_activation_grad(dy, y, jit=jit, activation=activation)
    # dW as a batch of one matrix product: TensorFlow's batched matmul (oneDNN) sums the long axis M faster
    # than its plain one (vgg_tiny's 6 -> 6 conv at 26x26: 1.4 against 1.9 CPU-ms; LeNet's 6 -> 16: 0.5 / 0.6).
    dw = tf.reshape(tf.matmul(x_col_t[None], dz[None])[0], tf.shape(kernel))
    dx_col = tf.matmul(dz, tf.reshape(kernel, [-1, filters]), transpose_b=True)  # (M, K*C)
    dx = col2im(dx_col, jit=jit, input_shape=input_shape, window=tuple(kernel.shape[:2]), strides=strides, pads=pads)
    return dx, dw, db


def conv2d(x, kernel, bias, strides, padding, activation=None):
    """2-D cross-correlation ``(N, H, W, C) -> (N, Ho, Wo, F)`` with the gradient of
    :func:`conv2d_backward`. ``bias`` may be ``None``; ``activation``, a name of :data:`ELEMENTWISE`
    or ``None``, is applied inside (its mask shared with the backward pass)."""
    input_shape, jit = tuple(x.shape), worth_compiling(x)
    pads = window_pads(*input_shape[1:3], tuple(kernel.shape[:2]), strides, padding)

    @tf.custom_gradient
    def _conv(x, kernel, *bias):
        y, x_col_t = conv2d_forward(x, kernel, bias[0] if bias else None, strides, pads, activation, jit)

        def grad(dy):
            dx, dw, db = conv2d_backward(dy, y, x_col_t, kernel, input_shape, strides, pads, activation, jit)
            return (dx, dw, db) if bias else (dx, dw)

        return y, grad

    return _conv(x, kernel) if bias is None else _conv(x, kernel, bias)


# --------------------------------------------------------------------------- pooling


@compiled
def max_pool_forward(x, *, window, strides, pads):
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


@compiled
def max_pool_backward(dy, x, y, *, window, strides, pads):
    """``dX = scatter(mask_k · dY)``: each ``dY`` goes to the first maximum of its window;
    overlapping windows add up. ``dy (N, Ho, Wo, C)`` -> ``dx (N, H, W, C)``. The patches are
    taken from ``x`` again (compiled, they fuse with the masks: cheaper than keeping K copies)."""
    patches = window_patches(x, window, strides, pads, float("-inf"))
    zeros = tf.zeros_like(dy)
    dpatches = [tf.where(mask, dy, zeros) for mask in first_max_masks(patches, y)]
    return scatter_patches(dpatches, tuple(x.shape[1:3]), window, strides, pads)


def max_pool2d(x, window, strides, padding):
    """Max pooling ``(N, H, W, C) -> (N, Ho, Wo, C)`` with the gradient of
    :func:`max_pool_backward`."""
    pads = window_pads(*x.shape[1:3], window, strides, padding)
    settings = {"jit": worth_compiling(x), "window": window, "strides": strides, "pads": pads}

    @tf.custom_gradient
    def _max_pool(x):
        y = max_pool_forward(x, **settings)

        def grad(dy):
            return max_pool_backward(dy, x, y, **settings)

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


@compiled
def avg_pool_forward(x, *, window, strides, pads):
    """``Y = Σ_k patch_k / count`` (count = real elements, padding excluded)."""
    counts = tf.cast(avg_pool_counts(tuple(x.shape[1:3]), window, strides, pads), x.dtype)
    return tf.add_n(window_patches(x, window, strides, pads)) / counts


@compiled
def avg_pool_backward(dy, *, input_hw, window, strides, pads):
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
    settings = {"jit": worth_compiling(x), "window": window, "strides": strides, "pads": pads}

    @tf.custom_gradient
    def _avg_pool(x):
        def grad(dy):
            return avg_pool_backward(dy, input_hw=input_hw, **settings)

        return avg_pool_forward(x, **settings), grad

    return _avg_pool(x)


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
