"""How the conv and pooling formulas of :mod:`models.ops` are made fast on CPU; the scratch conv and
pool layers run these.

Each function here computes one formula of ops.py, named in its docstring, with the same numbers up
to the order of float additions (tests/test_layers.py checks each against its formula). Three choices
keep the layers close to the oneDNN built-ins on CPU (``benchmarks/scratch_speed.py``,
``benchmarks/conv_variants.py``):

* window patches are unit-step slices of a stride-phase view of the input (:func:`phase_grid`):
  TensorFlow's strided slices are slow;
* the conv columns are built transposed, ``X_colᵀ (K*C, N*Ho*Wo)``, by stacking patches of channel
  planes (:func:`im2col`): K narrow NHWC patches side by side cost more than the whole built-in
  convolution when C = 1;
* everything of a layer that is not a matmul (patches, scatter-adds, bias, activation, max masks) is
  :func:`compiled` by XLA into a few loops over memory, while the matmuls stay TensorFlow's.

Notation as in :mod:`models.ops`.
"""

import functools
import math

import tensorflow as tf

from models import ops

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


# Compiling is paid once per piece and input shape: worth it for the batches that come again and again
# (training and evaluation over a dataset, traced with an unknown batch size, or batches of 32 images and
# more), not for a one-off call on a few images (a gradient check, one image's feature maps, the demo
# page), which runs the same functions as TensorFlow ops.
COMPILE_FROM_BATCH = 32


def worth_compiling(x):
    """Whether a layer's pieces are :func:`compiled` for the batch ``x``: see ``COMPILE_FROM_BATCH``."""
    return x.shape[0] is None or x.shape[0] >= COMPILE_FROM_BATCH


# --------------------------------------------------------------------------- window patches


def phase_grid_size(size, pads, window, stride):
    """Rows (or columns) ``hs`` of the stride-phase grid, with ``hs * s >= H + pads`` and
    ``hs >= Ho + (k - 1) // s``, so that every window offset is a plain slice of it."""
    padded = size + sum(pads)
    out = (padded - window) // stride + 1
    return max(out + (window - 1) // stride, math.ceil(padded / stride))


def phase_grid(x, window, strides, pads, pad_value=0.0):
    """The padded input ``x (A, H, W, *T)`` viewed as a stride-phase grid ``(A, Hs, sh, Ws, sw, *T)``
    (a free reshape), in which every window offset is a unit-step slice:
    ``x_pad[:, i*sh + a, j*sw + b] = grid[:, i + a//sh, a%sh, j + b//sw, b%sw]``."""
    (kh, kw), (sh, sw) = window, strides
    (top, _), (left, _) = pads
    h, w = x.shape[1:3]
    hs = phase_grid_size(h, pads[0], kh, sh)
    ws = phase_grid_size(w, pads[1], kw, sw)
    x = ops.pad_hw(x, (top, hs * sh - h - top), (left, ws * sw - w - left), pad_value)
    return tf.reshape(x, [-1, hs, sh, ws, sw, *x.shape[3:]])


def window_patches(x, window, strides, pads, pad_value=0.0):
    """:func:`ops.window_patches` as slices of :func:`phase_grid`:
    ``patch[a*kw + b] = grid[:, a//sh : a//sh + Ho, a%sh, b//sw : b//sw + Wo, b%sw]``."""
    (kh, kw), (sh, sw) = window, strides
    ho, wo = ops.window_output_hw(tuple(x.shape[1:3]), window, strides, pads)
    grid = phase_grid(x, window, strides, pads, pad_value)
    return [
        grid[:, a // sh : a // sh + ho, a % sh, b // sw : b // sw + wo, b % sw, ...]
        for a in range(kh)
        for b in range(kw)
    ]


def stacked_window_patches(x, window, strides, pads):
    """:func:`ops.window_patches` as one tensor ``(kh, kw, A, Ho, Wo, *T)``, stacked in two steps: the
    ``kw`` column offsets of whole rows, then the ``kh`` row offsets of that stack (compiled, two short
    stacks of slices run faster than one stack of ``K``)."""
    (kh, kw), (sh, sw) = window, strides
    ho, wo = ops.window_output_hw(tuple(x.shape[1:3]), window, strides, pads)
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
        tf.add_n([ops.pad_hw(dpatches[a * kw + b], (0, 0), (b // sw, ws - b // sw - wo)) for b in range(q, kw, sw)])
        for a in range(p, kh, sh)
    ]
    return tf.add_n(
        [ops.pad_hw(row, (a // sh, hs - a // sh - ho), (0, 0)) for a, row in zip(range(p, kh, sh), rows, strict=True)]
    )


def scatter_patches(dpatches, input_hw, window, strides, pads):
    """:func:`ops.scatter_patches` (the adjoint of :func:`window_patches`) by stride phases.

    Inside one stride phase ``(a % sh, b % sw)`` the targets form a dense sub-grid
    (:func:`phase_scatter`); the ``sh*sw`` phase grids are interleaved by stack + reshape, then the
    padding is cropped. Phases no window offset reaches (kernel smaller than the stride) stay zero.
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
    """:func:`ops.im2col` transposed: ``x (N, H, W, C)`` -> ``X_colᵀ (K*C, M)``,
    ``X_colᵀ[(a*kw + b)*C + c, (n*Ho + i)*Wo + j] = x_pad[n, i*sh + a, j*sw + b, c]``.

    Built from channel planes ``(C*N, H, W)``: each window offset then is one contiguous block of
    rows, so the K patches are just stacked (no narrow-chunk concat).
    """
    h, w, channels = x.shape[1:]
    planes = tf.reshape(tf.transpose(x, [3, 0, 1, 2]), [-1, h, w])  # (C*N, H, W)
    patches = stacked_window_patches(planes, window, strides, pads)  # (kh, kw, C*N, Ho, Wo)
    return tf.reshape(patches, [window[0] * window[1] * channels, -1])


@compiled
def col2im(dx_col, *, input_shape, window, strides, pads):
    """:func:`ops.col2im` with the phase scatter of :func:`scatter_patches`: ``dX_col (M, K*C)`` ->
    ``dx (N, H, W, C)``. ``dX_col`` untransposed: compiled, its NHWC blocks scatter faster than channel
    planes would."""
    h, w, channels = input_shape[1:]
    ho, wo = ops.window_output_hw((h, w), window, strides, pads)
    blocks = tf.unstack(tf.reshape(dx_col, [-1, ho, wo, window[0] * window[1], channels]), axis=3)
    return scatter_patches(blocks, (h, w), window, strides, pads)


@compiled
def conv_bias_activation(z_t, *bias, activation, shape):
    """:func:`ops.bias_activation` of ``Zᵀ (F, M)``, the transpose in the same compiled loop."""
    return ops.bias_activation(tf.transpose(z_t), *bias, activation=activation, shape=shape)


# Compiled for the convolutions, whose outputs are large; the dense layer runs ops.bias_activation and
# ops.activation_grad as TensorFlow ops (its outputs are small enough that XLA's launch costs more than
# it saves).
conv_activation_grad = compiled(ops.activation_grad)


def conv2d_forward(x, kernel, bias, strides, pads, activation=None, jit=False):
    """:func:`ops.conv2d_forward` ``Y = act(X_col · W + b)``, computed as ``act((Wᵀ · X_colᵀ)ᵀ + b)``.

    Returns ``(Y, X_colᵀ)`` (kept for the backward). With ``jit``, the pieces around the matmul are
    :func:`compiled`.
    """
    window, filters = tuple(kernel.shape[:2]), kernel.shape[3]
    x_col_t = im2col(x, jit=jit, window=window, strides=strides, pads=pads)
    z_t = tf.matmul(tf.reshape(kernel, [-1, filters]), x_col_t, transpose_a=True)  # (F, M)
    out_shape = (*ops.window_output_hw(tuple(x.shape[1:3]), window, strides, pads), filters)
    bias = () if bias is None else (bias,)
    y = conv_bias_activation(z_t, *bias, jit=jit, activation=activation, shape=out_shape)
    return y, x_col_t


def conv2d_backward(dy, y, x_col_t, kernel, input_shape, strides, pads, activation=None, jit=False):
    """:func:`ops.conv2d_backward` ``dZ = act'(dY)``, ``db = Σ dZ``, ``dW = X_colᵀ · dZ``,
    ``dX = col2im(dZ · Wᵀ)``, from ``X_colᵀ``.

    ``dW`` is a batch of one matrix product: TensorFlow's batched matmul (oneDNN) sums the long axis
    ``M`` faster than its plain one. With ``jit``, the pieces around the matmuls are :func:`compiled`.
    """
    filters = kernel.shape[3]
    dz, db = conv_activation_grad(dy, y, jit=jit, activation=activation)
    dw = tf.reshape(tf.matmul(x_col_t[None], dz[None])[0], tf.shape(kernel))
    dx_col = tf.matmul(dz, tf.reshape(kernel, [-1, filters]), transpose_b=True)  # (M, K*C)
    dx = col2im(dx_col, jit=jit, input_shape=input_shape, window=tuple(kernel.shape[:2]), strides=strides, pads=pads)
    return dx, dw, db


def conv2d(x, kernel, bias, strides, padding, activation=None):
    """2-D cross-correlation ``(N, H, W, C) -> (N, Ho, Wo, F)`` with the gradient of
    :func:`conv2d_backward`, compiled when :func:`worth_compiling`. ``bias`` may be ``None``;
    ``activation``, a name of :data:`ops.ELEMENTWISE` or ``None``, is applied inside (its mask shared
    with the backward pass)."""
    input_shape, jit = tuple(x.shape), worth_compiling(x)
    pads = ops.window_pads(*input_shape[1:3], tuple(kernel.shape[:2]), strides, padding)

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
    """:func:`ops.max_pool_forward` ``Y = max_k patch_k`` with the patches of :func:`window_patches`."""
    return functools.reduce(tf.maximum, window_patches(x, window, strides, pads, float("-inf")))


@compiled
def max_pool_backward(dy, x, y, *, window, strides, pads):
    """:func:`ops.max_pool_backward` ``dX = scatter(mask_k · dY)`` with :func:`window_patches` and
    :func:`scatter_patches`. The patches are taken from ``x`` again (compiled, they fuse with the
    masks: cheaper than keeping K copies)."""
    patches = window_patches(x, window, strides, pads, float("-inf"))
    zeros = tf.zeros_like(dy)
    dpatches = [tf.where(mask, dy, zeros) for mask in ops.first_max_masks(patches, y)]
    return scatter_patches(dpatches, tuple(x.shape[1:3]), window, strides, pads)


def max_pool2d(x, window, strides, padding):
    """Max pooling ``(N, H, W, C) -> (N, Ho, Wo, C)`` with the gradient of
    :func:`max_pool_backward`, compiled when :func:`worth_compiling`."""
    pads = ops.window_pads(*x.shape[1:3], window, strides, padding)
    settings = {"jit": worth_compiling(x), "window": window, "strides": strides, "pads": pads}

    @tf.custom_gradient
    def _max_pool(x):
        y = max_pool_forward(x, **settings)

        def grad(dy):
            return max_pool_backward(dy, x, y, **settings)

        return y, grad

    return _max_pool(x)


@compiled
def avg_pool_forward(x, *, window, strides, pads):
    """:func:`ops.avg_pool_forward` ``Y = Σ_k patch_k / count`` with the patches of :func:`window_patches`."""
    counts = tf.cast(ops.avg_pool_counts(tuple(x.shape[1:3]), window, strides, pads), x.dtype)
    return tf.add_n(window_patches(x, window, strides, pads)) / counts


@compiled
def avg_pool_backward(dy, *, input_hw, window, strides, pads):
    """:func:`ops.avg_pool_backward` ``dX = scatter(dY / count)`` with :func:`scatter_patches`."""
    counts = tf.cast(ops.avg_pool_counts(input_hw, window, strides, pads), dy.dtype)
    share = dy / counts
    return scatter_patches([share] * (window[0] * window[1]), input_hw, window, strides, pads)


def avg_pool2d(x, window, strides, padding):
    """Average pooling ``(N, H, W, C) -> (N, Ho, Wo, C)`` with the gradient of
    :func:`avg_pool_backward`, compiled when :func:`worth_compiling`."""
    input_hw = tuple(x.shape[1:3])
    pads = ops.window_pads(*input_hw, window, strides, padding)
    settings = {"jit": worth_compiling(x), "window": window, "strides": strides, "pads": pads}

    @tf.custom_gradient
    def _avg_pool(x):
        def grad(dy):
            return avg_pool_backward(dy, input_hw=input_hw, **settings)

        return avg_pool_forward(x, **settings), grad

    return _avg_pool(x)
