"""Scratch Keras layers and loss: conv, pooling, flatten, dense, activations, batch normalization,
dropout, global average pooling and softmax cross-entropy, each with a hand-derived backward pass
(the math is in :mod:`models.ops`; the conv and pool layers run its formulas as made fast in
:mod:`models.fast`).

Every layer mirrors its ``keras.layers`` twin: the same arguments and defaults where it
implements them, NHWC layout and the same weight shapes and names, so
``scratch.set_weights(builtin.get_weights())`` works. What differs is said in each docstring:
``data_format`` must be ``"channels_last"``; ``dilation_rate`` and ``groups`` must be 1;
activations are ``None``/``"linear"``, ``"relu"``, ``"sigmoid"``, ``"tanh"``, ``"softmax"`` (ours)
or a callable of your own, never another of Keras's. Regularizers and constraints are Keras's
own objects, applied the Keras way (penalties in ``layer.losses``, constraints after each
optimizer step); their gradients are TensorFlow's autodiff, the layers' own are written out.

The math uses TensorFlow primitives (pad, slices, stack, reshape, transpose, matmul,
elementwise ops, reductions) and gives every gradient through ``tf.custom_gradient``:
no convolution, pooling or activation kernel of TensorFlow (nor its gradient) is used.
"""

import math
import numbers

import keras
import tensorflow as tf

from models.fast import avg_pool2d, conv2d, max_pool2d
from models.ops import (
    ACTIVATIONS,
    batch_moments,
    batch_norm,
    dense,
    dropout,
    dropout_mask,
    elementwise_name,
    flatten,
    global_avg_pool,
    moving_average,
    output_size,
    sparse_softmax_cross_entropy,
)

_PADDINGS = ("valid", "same")


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


def _channels_last(value, owner):
    """``None`` means Keras's global ``image_data_format()``; only ``channels_last`` (NHWC) is built."""
    resolved = keras.config.image_data_format() if value is None else value
    if resolved != "channels_last":
        raise ValueError(
            f"{owner}: only data_format='channels_last' (NHWC) is implemented, received data_format={value!r}"
            + (f" (keras.config.image_data_format() is {resolved!r})" if value is None else "")
        )
    return resolved


def _only_one(value, name, owner, pair=True):
    """``dilation_rate`` / ``groups``: accepted as 1 (what the scratch math computes), else a clear error."""
    parsed = _positive_pair(value, name, owner) if pair else _positive_int(value, name, owner)
    if parsed not in ((1, 1), 1):
        raise ValueError(f"{owner}: only {name}=1 is implemented, received {name}={value!r}")
    return parsed


def _activation(value, owner):
    """``None``/``"linear"`` -> ``None`` (identity); a name -> the scratch activation of
    :data:`models.ops.ACTIVATIONS`; Keras's own function of that name -> ours too; another callable
    -> itself. Any other Keras activation is refused rather than silently differentiated by autodiff."""
    if value is None or value == "linear" or value is keras.activations.linear:
        return None
    if isinstance(value, str):
        if value not in ACTIVATIONS:
            raise ValueError(
                f"{owner}: activation must be None, 'linear' or one of {sorted(ACTIVATIONS)} "
                f"(scratch activations), received activation={value!r}"
            )
        return ACTIVATIONS[value]
    if not callable(value):
        raise ValueError(f"{owner}: activation must be a name or a callable, received activation={value!r}")
    keras_name = next((name for name in ACTIVATIONS if value is keras.activations.get(name)), None)
    if keras_name:
        return ACTIVATIONS[keras_name]
    if getattr(value, "__module__", "").startswith("keras"):
        raise ValueError(
            f"{owner}: Keras's {value.__name__!r} has no scratch version; use one of {sorted(ACTIVATIONS)}, "
            f"received activation={value!r}"
        )
    return value


def _serialize_activation(fn):
    """The name of a scratch activation (as Keras writes its own), ``"linear"`` for ``None``."""
    if fn is None:
        return "linear"
    name = next((name for name, op in ACTIVATIONS.items() if op is fn), None)
    return name or keras.activations.serialize(fn)


def _apply(activation, y):
    """``activation(y)``; ``None`` is linear, also when set on the layer after construction."""
    return y if activation is None else activation(y)


def _with_activation(op, activation, *args):
    """``activation(op(*args))``: an elementwise scratch activation goes inside ``op`` (its
    ``activation`` argument: one loop with the bias, its mask shared with the backward pass), any
    other after it."""
    name = elementwise_name(activation)
    return op(*args, activation=name) if name else _apply(activation, op(*args))


def _last_axis_spec(size):
    """Keras's check of a built layer's input: its last axis must be ``size``; a mismatch raises
    ``ValueError`` naming the expected value and the received shape."""
    return keras.layers.InputSpec(axes={-1: size})


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


_WEIGHT_ARGUMENTS = {"initializer": keras.initializers, "regularizer": keras.regularizers,
                     "constraint": keras.constraints}


def _set_weight_arguments(layer, **arguments):
    """``layer.<weight>_<kind> = keras.<kind>s.get(value)`` for each ``<weight>_<kind>=value`` argument
    (``kind``: initializer, regularizer or constraint)."""
    for key, value in arguments.items():
        setattr(layer, key, _WEIGHT_ARGUMENTS[key.rsplit("_", 1)[1]].get(value))


def _weight_config(layer, weights):
    """The initializers, regularizers and constraints that ``layer`` has of these weights, serialized as
    Keras does."""
    return {
        f"{weight}_{kind}": module.serialize(getattr(layer, f"{weight}_{kind}"))
        for weight in weights
        for kind, module in _WEIGHT_ARGUMENTS.items()
        if hasattr(layer, f"{weight}_{kind}")
    }


class _ScratchWeights(keras.layers.Layer):
    """Activation, kernel and bias arguments (Keras's names and defaults) shared by the scratch conv
    and dense layers."""

    def __init__(
        self,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.activation = _activation(activation, type(self).__name__)
        self.use_bias = use_bias
        _set_weight_arguments(
            self, kernel_initializer=kernel_initializer, bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint, bias_constraint=bias_constraint,
        )

    def _add_kernel_and_bias(self, kernel_shape, units):
        """The ``kernel`` and (``use_bias``) the ``(units,)`` ``bias``; the input's last axis is
        checked against the kernel from then on."""
        self.kernel = self.add_weight(
            name="kernel", shape=kernel_shape, initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer, constraint=self.kernel_constraint,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(units,), initializer=self.bias_initializer,
                regularizer=self.bias_regularizer, constraint=self.bias_constraint,
            )
        self.input_spec = _last_axis_spec(kernel_shape[-2])

    def _weights(self):
        """``(kernel, bias)`` as tensors; ``bias`` is ``None`` without one."""
        return tf.convert_to_tensor(self.kernel), None if self.bias is None else tf.convert_to_tensor(self.bias)

    def get_config(self):
        return {
            **super().get_config(),
            "activation": _serialize_activation(self.activation),
            "use_bias": self.use_bias,
            **_weight_config(self, ("kernel", "bias")),
        }


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchConv2D(_ScratchWeights):
    """2D convolution (cross-correlation) built from im2col + one matmul, with a
    hand-written backward pass. Twin of ``keras.layers.Conv2D``, with these differences:
    ``data_format`` must be ``"channels_last"``, ``dilation_rate`` and ``groups`` must be 1,
    ``activation`` is one of the scratch activations or your own callable (see the module).

    Args:
        filters: int, number of output channels.
        kernel_size: int or tuple of 2 ints, window height and width.
        strides: int or tuple of 2 ints, step of the window. Defaults to ``(1, 1)``.
        padding: ``"valid"`` (no padding) or ``"same"`` (TensorFlow's padding, output
            size ``ceil(input / stride)``), case-insensitive.
        data_format: ``"channels_last"`` or ``None`` (Keras's global setting, which must then
            be ``"channels_last"``).
        dilation_rate: 1 or ``(1, 1)``.
        groups: 1.
        activation: ``None``/``"linear"``, ``"relu"``, ``"sigmoid"``, ``"tanh"``, ``"softmax"``
            or a callable.
        use_bias: bool, whether to add a bias vector.
        kernel_initializer: initializer for the ``(kh, kw, in, filters)`` kernel.
        bias_initializer: initializer for the ``(filters,)`` bias.
        kernel_regularizer, bias_regularizer: Keras regularizers (penalties in ``layer.losses``).
        activity_regularizer: Keras regularizer of the output.
        kernel_constraint, bias_constraint: Keras constraints, applied after each optimizer step.
        **kwargs: base ``Layer`` arguments (``name``, ``dtype``, ``trainable``…).

    Input shape:
        4D tensor ``(batch, height, width, channels)``; once built, ``channels`` must match.

    Output shape:
        4D tensor ``(batch, new_height, new_width, filters)``.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        activation=None,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(activation, use_bias, **kwargs)  # + initializers, regularizers, constraints
        name = type(self).__name__
        self.filters = _positive_int(filters, "filters", name)
        self.kernel_size = _positive_pair(kernel_size, "kernel_size", name)
        self.strides = _positive_pair(strides, "strides", name)
        self.padding = _padding(padding, name)
        self.data_format = _channels_last(data_format, name)
        self.dilation_rate = _only_one(dilation_rate, "dilation_rate", name)
        self.groups = _only_one(groups, "groups", name, pair=False)

    def build(self, input_shape):
        _check_nhwc(input_shape, self.kernel_size, "kernel_size", self.padding, type(self).__name__)
        self._add_kernel_and_bias((*self.kernel_size, input_shape[-1], self.filters), self.filters)

    def call(self, inputs):
        return _with_activation(conv2d, self.activation, inputs, *self._weights(), self.strides, self.padding)

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
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "groups": self.groups,
        }


class _ScratchPool2D(keras.layers.Layer):
    """Shared argument handling of the scratch pooling layers; subclasses set ``pool_fn``.
    Built at construction (no weights) unless a subclass overrides ``build()``, as Keras's pooling
    layers are (``Layer._build_at_init``)."""

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None, **kwargs):
        super().__init__(**kwargs)
        name = type(self).__name__
        self.pool_size = _positive_pair(pool_size, "pool_size", name)
        self.strides = self.pool_size if strides is None else _positive_pair(strides, "strides", name)
        self.padding = _padding(padding, name)
        self.data_format = _channels_last(data_format, name)
        self._build_at_init()

    def call(self, inputs):
        _check_nhwc(inputs.shape, self.pool_size, "pool_size", self.padding, type(self).__name__)
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
            "data_format": self.data_format,
        }


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchMaxPool2D(_ScratchPool2D):
    """Max pooling from window gathers + a reduce, with a hand-written backward pass that
    routes each gradient to the first maximum of its window. Twin of
    ``keras.layers.MaxPooling2D``; ``data_format`` must be ``"channels_last"``.

    Args:
        pool_size: int or tuple of 2 ints, window height and width. Defaults to ``(2, 2)``.
        strides: int, tuple of 2 ints or ``None`` (= ``pool_size``).
        padding: ``"valid"`` or ``"same"`` (padded with −∞, never chosen).
        data_format: ``"channels_last"`` or ``None`` (Keras's global setting, which must then
            be ``"channels_last"``).
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
    ``keras.layers.AveragePooling2D``; ``data_format`` must be ``"channels_last"``.

    Args:
        pool_size: int or tuple of 2 ints, window height and width. Defaults to ``(2, 2)``
            (Keras's ``AveragePooling2D`` has no default).
        strides: int, tuple of 2 ints or ``None`` (= ``pool_size``).
        padding: ``"valid"`` or ``"same"`` (the mean is over real elements only).
        data_format: ``"channels_last"`` or ``None`` (Keras's global setting, which must then
            be ``"channels_last"``).
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
    ``keras.layers.Flatten``, whose ``data_format="channels_first"`` (a transpose to NCHW
    first) is not implemented.

    Args:
        data_format: ``"channels_last"`` or ``None`` (Keras's global setting, which must then
            be ``"channels_last"``).
        **kwargs: base ``Layer`` arguments.

    Input shape:
        tensor ``(batch, d1, d2, …)``.

    Output shape:
        2D tensor ``(batch, d1 * d2 * …)``.
    """

    def __init__(self, data_format=None, **kwargs):
        super().__init__(**kwargs)
        self.data_format = _channels_last(data_format, type(self).__name__)

    def call(self, inputs):
        return flatten(inputs)

    def compute_output_shape(self, input_shape):
        rest = input_shape[1:]
        size = None if None in rest else math.prod(rest)
        return (input_shape[0], size)

    def get_config(self):
        return {**super().get_config(), "data_format": self.data_format}


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchDense(_ScratchWeights):
    """Fully connected layer ``activation(x · W + b)`` with a hand-written backward pass;
    twin of ``keras.layers.Dense`` for 2D inputs only (Keras's also takes N-D inputs and
    ``lora_rank``), with the scratch activations (see the module).

    Args:
        units: int, output dimension.
        activation: ``None``/``"linear"``, ``"relu"``, ``"sigmoid"``, ``"tanh"``, ``"softmax"``
            or a callable.
        use_bias: bool, whether to add a bias vector.
        kernel_initializer: initializer for the ``(in, units)`` kernel.
        bias_initializer: initializer for the ``(units,)`` bias.
        kernel_regularizer, bias_regularizer: Keras regularizers (penalties in ``layer.losses``).
        activity_regularizer: Keras regularizer of the output.
        kernel_constraint, bias_constraint: Keras constraints, applied after each optimizer step.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        2D tensor ``(batch, input_dim)``; once built, ``input_dim`` must match.

    Output shape:
        2D tensor ``(batch, units)``.
    """

    def __init__(self, units, activation=None, use_bias=True, **kwargs):
        super().__init__(activation, use_bias, **kwargs)  # + initializers, regularizers, constraints
        self.units = _positive_int(units, "units", type(self).__name__)
        self.supports_masking = True

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"{type(self).__name__}: expected a 2D input (batch, features), "
                f"received input_shape={tuple(input_shape)}"
            )
        self._add_kernel_and_bias((input_shape[-1], self.units), self.units)

    def call(self, inputs):
        return _with_activation(dense, self.activation, inputs, *self._weights())

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchActivation(keras.layers.Layer):
    """A scratch activation as a layer; twin of ``keras.layers.Activation`` for the names
    ``"linear"``, ``"relu"``, ``"sigmoid"``, ``"tanh"``, ``"softmax"`` (softmax over the last axis)
    or a callable of your own.

    Args:
        activation: the activation's name or a callable.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        any tensor.

    Output shape:
        the input's shape.
    """

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation = _activation(activation, type(self).__name__)
        self.supports_masking = True
        self._build_at_init()  # built at construction unless a subclass overrides build(), as Keras's Activation

    def call(self, inputs):
        return _apply(self.activation, inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "activation": _serialize_activation(self.activation)}


def _unit_interval(value, name, owner, upper_open=False):
    """A real number in [0, 1] (or [0, 1) with ``upper_open``), as a float."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and 0 <= value and (value < 1 if upper_open else value <= 1)):
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{owner}: {name} must be a number in {interval}, received {name}={value!r}")
    return float(value)


_BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")  # Keras's names and order


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchBatchNormalization(keras.layers.Layer):
    """Batch normalization of the last axis (channels) with a hand-derived backward pass; twin of
    ``keras.layers.BatchNormalization`` for ``axis=-1``, without ``renorm`` or a ``mask``.

    In training (``training=True`` and the layer trainable, as Keras decides) each channel is normalized
    with the mean and (biased) variance of this batch over every other axis,
    ``y = γ · (x − μ) / √(σ² + ε) + β``, and each moving statistic becomes
    ``moving · momentum + batch · (1 − momentum)``; in inference the moving statistics are used.
    Under a ``tf.distribute`` strategy (e.g. ``MirroredStrategy``) each replica normalizes with its own
    batch's statistics and updates its own copy of the moving statistics, as Keras's layer does with its
    default ``synchronized=False``; with ``synchronized=True`` every replica uses the global batch's
    statistics (the per-channel sums all-reduced over the replicas, forward and backward).

    Args:
        axis: -1 (the last axis, also accepted as its positive index).
        momentum: float in [0, 1], weight of the old moving statistic. Defaults to 0.99.
        epsilon: float > 0 added to the variance. Defaults to 1e-3.
        center: bool, whether to add the offset ``beta``.
        scale: bool, whether to multiply by ``gamma``.
        beta_initializer, gamma_initializer: initializers of ``beta`` (zeros) and ``gamma`` (ones).
        moving_mean_initializer, moving_variance_initializer: initializers of the moving statistics
            (zeros and ones).
        beta_regularizer, gamma_regularizer: Keras regularizers (penalties in ``layer.losses``).
        beta_constraint, gamma_constraint: Keras constraints, applied after each optimizer step.
        synchronized: bool, whether the replicas share the global batch's statistics.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        tensor ``(batch, …, channels)`` of rank ≥ 2 (NHWC conv outputs, dense outputs); once built,
        ``channels`` must match.

    Output shape:
        the input's shape.
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        name = type(self).__name__
        if axis != -1 and not _is_positive_int(axis):
            raise ValueError(f"{name}: only the last axis is normalized (axis=-1), received axis={axis!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or epsilon <= 0:
            raise ValueError(f"{name}: epsilon must be a number > 0, received epsilon={epsilon!r}")
        self.axis, self.synchronized = axis, bool(synchronized)
        self.momentum, self.epsilon = _unit_interval(momentum, "momentum", name), float(epsilon)
        self.center, self.scale = bool(center), bool(scale)
        _set_weight_arguments(
            self, beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer, moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint,
        )
        self.supports_masking = True
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2 or self.axis not in (-1, rank - 1):
            raise ValueError(
                f"{type(self).__name__}: expected an input of rank >= 2 normalized over its last axis, "
                f"received input_shape={tuple(input_shape)} with axis={self.axis!r}"
            )
        for weight, used in zip(_BN_WEIGHTS, (self.scale, self.center, True, True), strict=True):
            if used:
                setattr(self, weight, self.add_weight(
                    name=weight, shape=(input_shape[-1],), initializer=getattr(self, f"{weight}_initializer"),
                    regularizer=getattr(self, f"{weight}_regularizer", None),
                    constraint=getattr(self, f"{weight}_constraint", None),
                    trainable=not weight.startswith("moving_"), autocast=False,
                ))
        self.input_spec = keras.layers.InputSpec(ndim=rank, axes={-1: input_shape[-1]})

    def call(self, inputs, training=None):
        x = tf.convert_to_tensor(inputs)
        if x.dtype in (tf.float16, tf.bfloat16):
            x = tf.cast(x, tf.float32)  # statistics of half-precision inputs in float32, as Keras computes them
        gamma, beta = (None if w is None else tf.cast(w, x.dtype) for w in (self.gamma, self.beta))
        if training and self.trainable:
            total = self._replica_sum() if self.synchronized else None
            mean, variance = batch_moments(tf.stop_gradient(x), total)
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                moving.assign(tf.cast(moving_average(tf.cast(moving, x.dtype), batch, self.momentum), moving.dtype))
            y = batch_norm(x, mean, variance, gamma, beta, self.epsilon, training=True, total=total)
        else:
            mean, variance = (tf.cast(w, x.dtype) for w in (self.moving_mean, self.moving_variance))
            y = batch_norm(x, mean, variance, gamma, beta, self.epsilon, training=False)
        return tf.cast(y, self.compute_dtype)

    @staticmethod
    def _replica_sum():
        """The sum over the replicas in sync (an all-reduce), or ``None`` outside a replica context or
        with one replica: this batch's statistics, as Keras's synchronized layer falls back to."""
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return None
        return lambda t: context.all_reduce(tf.distribute.ReduceOp.SUM, t)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            **_weight_config(self, _BN_WEIGHTS),
            "synchronized": self.synchronized,
        }


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchDropout(keras.layers.Layer):
    """Inverted dropout with a hand-written backward pass; twin of ``keras.layers.Dropout``.

    In training each unit is kept where a uniform draw ``u ∈ [0, 1)`` is ``≥ rate`` and scaled by
    ``1 / (1 − rate)``; the backward pass uses the same mask and scale. The draws come from a
    ``keras.random.SeedGenerator(seed)`` as Keras's layer draws them, so a twin with the same seed
    drops the same units. In inference the layer is the identity.

    Args:
        rate: float in [0, 1), the fraction of units dropped (Keras's also takes 1: all dropped).
        noise_shape: ``None`` or a tuple (``None`` entries take the input's size) that the mask is
            drawn in and broadcast from, e.g. ``(batch, 1, 1, channels)`` drops whole feature maps.
        seed: int or ``None``, the seed of the draws.
        **kwargs: base ``Layer`` arguments.

    Input shape:
        any tensor.

    Output shape:
        the input's shape.
    """

    def __init__(self, rate, noise_shape=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        name = type(self).__name__
        self.rate = _unit_interval(rate, "rate", name, upper_open=True)
        if noise_shape is not None and not (
            isinstance(noise_shape, (tuple, list)) and all(d is None or _is_positive_int(d) for d in noise_shape)
        ):
            raise ValueError(
                f"{name}: noise_shape must be None or a tuple of positive integers or None, "
                f"received noise_shape={noise_shape!r}"
            )
        if seed is not None and not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
            raise ValueError(f"{name}: seed must be an integer or None, received seed={seed!r}")
        self.noise_shape = None if noise_shape is None else tuple(noise_shape)
        self.seed = seed
        if self.rate > 0:
            self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True
        self._build_at_init()  # no weights: built at construction, as Keras's Dropout

    def call(self, inputs, training=False):
        if not (training and self.rate > 0):
            return inputs
        x = tf.convert_to_tensor(inputs)
        shape = tf.shape(x) if self.noise_shape is None else [
            tf.shape(x)[i] if d is None else d for i, d in enumerate(self.noise_shape)
        ]
        uniform = keras.random.uniform(shape, dtype=x.dtype, seed=self.seed_generator)
        return dropout(x, dropout_mask(uniform, self.rate), self.rate)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed, "noise_shape": self.noise_shape}


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchGlobalAveragePooling2D(keras.layers.Layer):
    """Mean of each channel over height and width with a hand-written backward pass (each position
    gets ``1 / (H·W)`` of the gradient); twin of ``keras.layers.GlobalAveragePooling2D``;
    ``data_format`` must be ``"channels_last"``.

    Args:
        data_format: ``"channels_last"`` or ``None`` (Keras's global setting, which must then
            be ``"channels_last"``).
        keepdims: bool, whether to keep the height and width axes (as size 1).
        **kwargs: base ``Layer`` arguments.

    Input shape:
        4D tensor ``(batch, height, width, channels)``.

    Output shape:
        2D tensor ``(batch, channels)``, or ``(batch, 1, 1, channels)`` with ``keepdims``.
    """

    def __init__(self, data_format=None, keepdims=False, **kwargs):
        super().__init__(**kwargs)
        self.data_format = _channels_last(data_format, type(self).__name__)
        self.keepdims = bool(keepdims)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self._build_at_init()  # no weights: built at construction, as Keras's pooling layers

    def call(self, inputs):
        return global_avg_pool(tf.convert_to_tensor(inputs), self.keepdims)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 1, 1, input_shape[3]) if self.keepdims else (input_shape[0], input_shape[3])

    def get_config(self):
        return {**super().get_config(), "data_format": self.data_format, "keepdims": self.keepdims}


# --------------------------------------------------------------------------- loss


@keras.saving.register_keras_serializable(package="lenet_lab")
class ScratchSparseCategoricalCrossentropy(keras.losses.Loss):
    """Mean softmax cross-entropy of integer labels, fused and hand-derived
    (:func:`models.ops.sparse_softmax_cross_entropy`: log-sum-exp forward, gradient
    ``(p − y) / N`` at the logits). Twin of ``keras.losses.SparseCategoricalCrossentropy``
    with its default mean over the batch; no ``sample_weight``, ``ignore_class`` or ``axis``.

    ``y_pred`` is a softmax's output (ours or Keras's: the logits it carries are used) or, with
    ``from_logits=True``, the logits. Probabilities without their logits (e.g. after a dtype cast)
    are taken as ``log(clip(p, ε, 1 − ε))``, as Keras does; that log is then autodiff.

    Args:
        from_logits: whether ``y_pred`` are logits.
        name: the loss's name.
    """

    def __init__(self, from_logits=False, name="sparse_categorical_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.from_logits = from_logits

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(f"{type(self).__name__} takes no sample_weight, received {sample_weight!r}")
        with keras.name_scope(self.name):
            loss = self.call(y_true, y_pred)
        # Under a tf.distribute strategy the replicas' gradients are summed: each replica's mean then counts
        # 1/replicas, the scaling Keras's own losses apply (and its loss tracker undoes for display).
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return loss / replicas if replicas > 1 else loss

    def call(self, y_true, y_pred):
        logits = y_pred if self.from_logits else getattr(y_pred, "_keras_logits", None)
        if logits is None:
            eps = keras.config.epsilon()
            logits = tf.math.log(tf.clip_by_value(tf.cast(y_pred, self.dtype), eps, 1 - eps))
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        return sparse_softmax_cross_entropy(labels, tf.cast(logits, self.dtype))

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits}
