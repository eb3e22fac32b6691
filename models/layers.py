"""Scratch Keras layers: conv, pooling, flatten and dense with hand-derived backward passes.

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
import numbers

import keras
import tensorflow as tf

_PADDINGS = ("valid", "same")


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


# --------------------------------------------------------------------------- argument checks


def _is_positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _positive_int(value, name, owner):
    if not _is_positive_int(value):
        raise ValueError(f"{owner}: {name} must be a positive integer, received {name}={value!r}")
    return int(value)


def _positive_pair(value, name, owner):
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_is_positive_int, pair))):
        raise ValueError(
            f"{owner}: {name} must be a positive integer or a tuple of 2 positive integers, received {name}={value!r}"
        )
    return tuple(int(v) for v in pair)


def _padding(value, owner):
    if not isinstance(value, str) or value.lower() not in _PADDINGS:
        raise ValueError(f"{owner}: padding must be 'valid' or 'same', received padding={value!r}")
    return value.lower()


def _check_nhwc(input_shape, window, window_name, padding, owner):
    """Input must be 4D NHWC and, for 'valid', at least as large as the window."""
    if len(input_shape) != 4:
        raise ValueError(
            f"{owner}: expected a 4D input (batch, height, width, channels), received input_shape={tuple(input_shape)}"
        )
    for size, k in zip(input_shape[1:3], window, strict=True):
        if padding == "valid" and size is not None and size < k:
            raise ValueError(
                f"{owner}: {window_name}={window} is larger than the input with padding='valid', "
                f"received input_shape={tuple(input_shape)}"
            )


def _window_output_shape(input_shape, window, strides, padding, channels):
    h, w = input_shape[1:3]
    return (
        input_shape[0],
        output_size(h, window[0], strides[0], padding),
        output_size(w, window[1], strides[1], padding),
        channels,
    )


# --------------------------------------------------------------------------- layers


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchConv2D(keras.layers.Layer):
    """2D convolution (cross-correlation) built from im2col + one matmul, with a
    hand-written backward pass. Drop-in twin of ``keras.layers.Conv2D`` (channels_last).

    Args:
        filters: int, number of output channels.
        kernel_size: int or tuple of 2 ints, window height and width.
        strides: int or tuple of 2 ints, step of the window. Defaults to ``(1, 1)``.
        padding: ``"valid"`` (no padding) or ``"same"`` (TensorFlow's padding, output
            size ``ceil(input / stride)``), case-insensitive.
        activation: activation name or callable applied to the output; ``None`` = linear.
        use_bias: bool, whether to add a bias vector.
        kernel_initializer: initializer for the ``(kh, kw, in, filters)`` kernel.
        bias_initializer: initializer for the ``(filters,)`` bias.
        **kwargs: base ``Layer`` arguments (``name``, ``dtype``, ``trainable``…).

    Input shape:
        4D tensor ``(batch, height, width, channels)``.

    Output shape:
        4D tensor ``(batch, new_height, new_width, filters)``.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        name = type(self).__name__
        self.filters = _positive_int(filters, "filters", name)
        self.kernel_size = _positive_pair(kernel_size, "kernel_size", name)
        self.strides = _positive_pair(strides, "strides", name)
        self.padding = _padding(padding, name)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        _check_nhwc(input_shape, self.kernel_size, "kernel_size", self.padding, type(self).__name__)
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, input_shape[-1], self.filters),
            initializer=self.kernel_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=self.bias_initializer)

    def call(self, inputs):
        bias = None if self.bias is None else tf.convert_to_tensor(self.bias)
        y = conv2d(inputs, tf.convert_to_tensor(self.kernel), bias, self.strides, self.padding)
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        _check_nhwc(input_shape, self.kernel_size, "kernel_size", self.padding, type(self).__name__)
        return _window_output_shape(input_shape, self.kernel_size, self.strides, self.padding, self.filters)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }


class _ScratchPool2D(keras.layers.Layer):
    """Shared argument handling of the scratch pooling layers; subclasses set ``pool_fn``."""

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", **kwargs):
        super().__init__(**kwargs)
        name = type(self).__name__
        self.pool_size = _positive_pair(pool_size, "pool_size", name)
        self.strides = self.pool_size if strides is None else _positive_pair(strides, "strides", name)
        self.padding = _padding(padding, name)

    def build(self, input_shape):
        _check_nhwc(input_shape, self.pool_size, "pool_size", self.padding, type(self).__name__)

    def call(self, inputs):
        return self.pool_fn(inputs, self.pool_size, self.strides, self.padding)

    def compute_output_shape(self, input_shape):
        _check_nhwc(input_shape, self.pool_size, "pool_size", self.padding, type(self).__name__)
        return _window_output_shape(input_shape, self.pool_size, self.strides, self.padding, input_shape[3])

    def get_config(self):
        return {
            **super().get_config(),
            "pool_size": self.pool_size,
            "strides": self.strides,
            "padding": self.padding,
        }


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchMaxPool2D(_ScratchPool2D):
    """Max pooling from window gathers + a reduce, with a hand-written backward pass that
    routes each gradient to the first maximum of its window. Twin of
    ``keras.layers.MaxPooling2D`` (channels_last).

    Args:
        pool_size: int or tuple of 2 ints, window height and width. Defaults to ``(2, 2)``.
        strides: int, tuple of 2 ints or ``None`` (= ``pool_size``).
        padding: ``"valid"`` or ``"same"`` (padded with −∞, never chosen).
        **kwargs: base ``Layer`` arguments.

    Input shape:
        4D tensor ``(batch, height, width, channels)``.

    Output shape:
        4D tensor ``(batch, pooled_height, pooled_width, channels)``.
    """

    pool_fn = staticmethod(max_pool2d)


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchAvgPool2D(_ScratchPool2D):
    """Average pooling from window gathers + a reduce, with a hand-written backward pass
    that spreads each gradient evenly over its window. Twin of
    ``keras.layers.AveragePooling2D`` (channels_last).

    Args:
        pool_size: int or tuple of 2 ints, window height and width. Defaults to ``(2, 2)``.
        strides: int, tuple of 2 ints or ``None`` (= ``pool_size``).
        padding: ``"valid"`` or ``"same"`` (the mean is over real elements only).
        **kwargs: base ``Layer`` arguments.

    Input shape:
        4D tensor ``(batch, height, width, channels)``.

    Output shape:
        4D tensor ``(batch, pooled_height, pooled_width, channels)``.
    """

    pool_fn = staticmethod(avg_pool2d)


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchFlatten(keras.layers.Layer):
    """Flattens every sample to a vector (row-major, i.e. NHWC order); twin of
    ``keras.layers.Flatten``.

    Input shape:
        tensor ``(batch, d1, d2, …)``.

    Output shape:
        2D tensor ``(batch, d1 * d2 * …)``.
    """

    def call(self, inputs):
        return flatten(inputs)

    def compute_output_shape(self, input_shape):
        rest = input_shape[1:]
        size = None if None in rest else math.prod(rest)
        return (input_shape[0], size)


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchDense(keras.layers.Layer):
    """Fully connected layer ``activation(x · W + b)`` with a hand-written backward pass;
    twin of ``keras.layers.Dense`` for 2D inputs.

    Args:
        units: int, output dimension.
        activation: activation name or callable; ``None`` = linear.
        use_bias: bool, whether to add a bias vector.
        kernel_initializer: initializer for the ``(in, units)`` kernel.
        bias_initializer: initializer for the ``(units,)`` bias.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        2D tensor ``(batch, input_dim)``.

    Output shape:
        2D tensor ``(batch, units)``.
    """

    def __init__(
        self,
        units,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = _positive_int(units, "units", type(self).__name__)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"{type(self).__name__}: expected a 2D input (batch, features), "
                f"received input_shape={tuple(input_shape)}"
            )
        self.kernel = self.add_weight(
            name="kernel", shape=(input_shape[-1], self.units), initializer=self.kernel_initializer
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.units,), initializer=self.bias_initializer)

    def call(self, inputs):
        bias = None if self.bias is None else tf.convert_to_tensor(self.bias)
        return self.activation(dense(inputs, tf.convert_to_tensor(self.kernel), bias))

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        }
