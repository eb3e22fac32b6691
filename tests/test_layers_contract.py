"""Keras's layer contract, where the scratch layers once differed from their twins: pooling and
activation layers built at construction, except in a subclass that overrides ``build()`` (whose build
must run), the input's last axis checked against a built kernel, ``activation = None`` after
construction, masking, ``data_format`` / ``dilation_rate`` / ``groups``, regularizers and constraints,
and which activations a scratch layer takes."""


import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import layers as scratch_layers  # noqa: E402
from models import ops  # noqa: E402
from models.layers import (  # noqa: E402
    ScratchActivation,
    ScratchAvgPool2D,
    ScratchBatchNormalization,
    ScratchConv2D,
    ScratchDense,
    ScratchDropout,
    ScratchFlatten,
    ScratchGlobalAveragePooling2D,
    ScratchMaxPool2D,
)

TOL = {"atol": 1e-5, "rtol": 1e-4}
L = keras.layers


def random(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize(
    "scratch, builtin", [(ScratchMaxPool2D, L.MaxPooling2D), (ScratchAvgPool2D, L.AveragePooling2D)]
)
def test_pooling_layers_are_built_at_construction(scratch, builtin):
    assert builtin(2).built  # Keras's contract
    assert scratch(2).built
    np.testing.assert_allclose(scratch(2)(random((1, 4, 4, 2))), builtin(2)(random((1, 4, 4, 2))), **TOL)


BUILD_TWINS = [  # (scratch layer, its built-in twin, constructor arguments, input shape)
    (ScratchConv2D, L.Conv2D, (2, 3), (2, 6, 6, 3)),
    (ScratchMaxPool2D, L.MaxPooling2D, (2,), (2, 6, 6, 3)),
    (ScratchAvgPool2D, L.AveragePooling2D, (2,), (2, 6, 6, 3)),
    (ScratchFlatten, L.Flatten, (), (2, 6, 6, 3)),
    (ScratchDense, L.Dense, (3,), (2, 5)),
    (ScratchActivation, L.Activation, ("relu",), (2, 5)),
    (ScratchBatchNormalization, L.BatchNormalization, (), (2, 6, 6, 3)),
    (ScratchDropout, L.Dropout, (0.5,), (2, 5)),
    (ScratchGlobalAveragePooling2D, L.GlobalAveragePooling2D, (), (2, 6, 6, 3)),
]
BUILD_IDS = [scratch.__name__ for scratch, *_ in BUILD_TWINS]


def test_build_twins_cover_every_scratch_layer():
    layers = {cls for name, cls in vars(scratch_layers).items()
              if isinstance(cls, type) and issubclass(cls, L.Layer) and not name.startswith("_")}
    assert layers == {scratch for scratch, *_ in BUILD_TWINS}


def own_build_subclass(cls):
    """A user's subclass of ``cls`` that overrides ``build()`` (calling the parent's), and the list of
    input shapes its build was called with."""
    calls = []

    class OwnBuild(cls):
        def build(self, input_shape):
            calls.append(tuple(input_shape))
            super().build(input_shape)

    return OwnBuild, calls


@pytest.mark.parametrize("scratch, builtin, args, shape", BUILD_TWINS, ids=BUILD_IDS)
def test_built_at_construction_exactly_when_the_builtin_twin_is(scratch, builtin, args, shape):
    for cls in (builtin, scratch):  # Keras's rule: built at construction unless the layer has a build()
        layer = cls(*args)
        assert layer.built is builtin(*args).built, cls.__name__
        keras.Sequential([keras.Input(shape[1:]), layer])
        assert layer.built, cls.__name__  # a model built it, if it was not yet


@pytest.mark.parametrize("scratch, builtin, args, shape", BUILD_TWINS, ids=BUILD_IDS)
@pytest.mark.parametrize("call", ["eager", "model"])
def test_a_subclass_overriding_build_starts_unbuilt_and_builds_on_first_call(scratch, builtin, args, shape, call):
    output_shapes = []
    for cls in (builtin, scratch):
        subclass, calls = own_build_subclass(cls)
        layer = subclass(*args)
        assert not layer.built, cls.__name__  # as Keras's own layer tests check: the subclass's build must run
        if call == "eager":
            y = layer(random(shape))
        else:
            y = keras.Sequential([keras.Input(shape[1:]), layer])(random(shape))
        assert layer.built, cls.__name__
        assert calls == [(shape[0] if call == "eager" else None, *shape[1:])], cls.__name__
        output_shapes.append(tuple(y.shape))
        layer(random(shape))
        assert len(calls) == 1, cls.__name__  # built once
    assert output_shapes[1] == output_shapes[0]


@pytest.mark.parametrize(
    "layer, built_on, received",
    [
        (lambda: ScratchDense(3), (None, 12), (2, 5)),
        (lambda: ScratchConv2D(4, 3), (None, 8, 8, 3), (2, 8, 8, 2)),
    ],
    ids=["dense", "conv"],
)
def test_input_last_axis_checked_against_the_built_kernel(layer, built_on, received):
    layer = layer()
    layer.build(built_on)
    expected = rf"expected axis -1 .* value {built_on[-1]}.* shape \({received[0]}, .*{received[-1]}\)"
    with pytest.raises(ValueError, match=expected):
        layer(random(received))
    with pytest.raises(ValueError, match=rf"value {built_on[-1]}"):  # symbolic inputs: a model that would not run
        layer(keras.Input(received[1:]))


def test_wrongly_connected_model_fails_while_building():
    dense = ScratchDense(4)
    keras.Sequential([keras.Input((6,)), dense])
    with pytest.raises(ValueError, match="value 6"):
        keras.Sequential([keras.Input((5,)), dense])


@pytest.mark.parametrize(
    "scratch, builtin, shape",
    [(ScratchDense(3, activation="relu"), L.Dense(3, activation="relu"), (4, 6)),
     (ScratchConv2D(2, 3, activation="tanh"), L.Conv2D(2, 3, activation="tanh"), (2, 5, 5, 3))],
    ids=["dense", "conv"],
)
def test_activation_none_after_construction_is_linear(scratch, builtin, shape):
    x = random(shape)
    builtin(x), scratch(x)
    scratch.set_weights(builtin.get_weights())
    scratch.activation = builtin.activation = None
    y = scratch(x)
    np.testing.assert_allclose(y, builtin(x), **TOL)
    assert np.any(y < 0)  # really linear: neither relu nor a squashed tanh range
    assert scratch.get_config()["activation"] == "linear"


def test_dense_supports_masking_like_keras():
    assert ScratchDense(3).supports_masking is L.Dense(3).supports_masking is True
    masked = keras.Sequential([keras.Input((4,)), L.Masking(0.0), ScratchDense(2)])
    assert masked(random((3, 4))).shape == (3, 2)


CHANNELS_LAST_LAYERS = [
    lambda **kw: ScratchConv2D(2, 3, **kw),
    lambda **kw: ScratchMaxPool2D(2, **kw),
    lambda **kw: ScratchAvgPool2D(2, **kw),
    lambda **kw: ScratchFlatten(**kw),
    lambda **kw: ScratchGlobalAveragePooling2D(**kw),
]
CHANNELS_LAST_TWINS = [
    lambda **kw: L.Conv2D(2, 3, **kw),
    lambda **kw: L.MaxPooling2D(2, **kw),
    lambda **kw: L.AveragePooling2D(2, **kw),
    lambda **kw: L.Flatten(**kw),
    lambda **kw: L.GlobalAveragePooling2D(**kw),
]
FORMAT_IDS = ["conv", "maxpool", "avgpool", "flatten", "global_avgpool"]


@pytest.mark.parametrize("make, twin", zip(CHANNELS_LAST_LAYERS, CHANNELS_LAST_TWINS, strict=True), ids=FORMAT_IDS)
def test_data_format_channels_last_accepted_channels_first_refused(make, twin):
    x = random((2, 6, 6, 3))
    layer = make(data_format="channels_last")
    assert layer.get_config()["data_format"] == twin(data_format="channels_last").get_config()["data_format"]
    assert layer(x).shape == twin(data_format="channels_last")(x).shape
    with pytest.raises(ValueError, match=r"only data_format='channels_last'.*received data_format='channels_first'"):
        make(data_format="channels_first")


def test_data_format_none_follows_keras_global_setting():
    assert ScratchFlatten().get_config()["data_format"] == "channels_last"
    keras.config.set_image_data_format("channels_first")
    try:
        with pytest.raises(ValueError, match=r"received data_format=None \(keras.config.image_data_format\(\) is"):
            ScratchConv2D(2, 3)
    finally:
        keras.config.set_image_data_format("channels_last")


def test_dilation_rate_and_groups_of_one_accepted_others_refused():
    config = ScratchConv2D(2, 3, dilation_rate=1, groups=1).get_config()
    builtin = L.Conv2D(2, 3, dilation_rate=1, groups=1).get_config()
    assert (config["dilation_rate"], config["groups"]) == (builtin["dilation_rate"], builtin["groups"]) == ((1, 1), 1)
    with pytest.raises(ValueError, match=r"only dilation_rate=1 is implemented, received dilation_rate=\(2, 1\)"):
        ScratchConv2D(2, 3, dilation_rate=(2, 1))
    with pytest.raises(ValueError, match=r"only groups=1 is implemented, received groups=2"):
        ScratchConv2D(2, 3, groups=2)
    with pytest.raises(ValueError, match=r"dilation_rate must be a positive integer.*received dilation_rate=0"):
        ScratchConv2D(2, 3, dilation_rate=0)


REGULARIZED = {
    "kernel_regularizer": keras.regularizers.L2(0.05),
    "bias_regularizer": keras.regularizers.L1(0.1),
    "activity_regularizer": keras.regularizers.L2(0.01),
    "kernel_constraint": keras.constraints.MaxNorm(0.3),
    "bias_constraint": keras.constraints.NonNeg(),
    "bias_initializer": "random_normal",
}


def twin_models(kind):
    conv, dense = (ScratchConv2D, ScratchDense) if kind == "scratch" else (L.Conv2D, L.Dense)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        conv(3, 3, activation="relu", **REGULARIZED),
        ScratchFlatten() if kind == "scratch" else L.Flatten(),
        dense(4, activation="softmax", **REGULARIZED),
    ])


def test_regularizers_and_constraints_act_as_in_keras():
    x, y = random((16, 6, 6, 2)), np.arange(16) % 4
    keras.utils.set_random_seed(0)
    builtin, scratch = twin_models("builtin"), twin_models("scratch")
    scratch.set_weights(builtin.get_weights())
    penalties = []
    for model in (builtin, scratch):
        model(x)  # the activity penalties are those of the last call
        penalties.append([float(loss) for loss in model.losses])
    assert len(penalties[0]) == 6  # kernel, bias and activity penalty of both layers
    np.testing.assert_allclose(penalties[1], penalties[0], **TOL)
    for model in (builtin, scratch):
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(scratch.get_weights(), builtin.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-3)
    conv_kernel, conv_bias = scratch.layers[0].get_weights()
    assert np.all(conv_bias >= 0)  # NonNeg held
    assert np.all(np.sqrt(np.sum(conv_kernel**2, axis=0)) <= 0.3 + 1e-6)  # MaxNorm (Keras's axis 0) held


@pytest.mark.parametrize("scratch, builtin", [(ScratchConv2D, L.Conv2D), (ScratchDense, L.Dense)])
def test_regularizer_and_constraint_config_matches_builtin(scratch, builtin):
    args = (3, 3) if scratch is ScratchConv2D else (3,)
    config = scratch(*args, name="twin", **REGULARIZED).get_config()
    assert scratch.from_config(config).get_config() == config
    builtin_config = builtin(*args, name="twin", **REGULARIZED).get_config()
    assert {key: config[key] for key in builtin_config if key in config} == {
        key: builtin_config[key] for key in builtin_config if key in config
    }
    assert {key for key in REGULARIZED} <= set(config)


def test_scratch_layers_take_scratch_activations_only():
    assert ScratchDense(2, activation="relu").activation is ops.relu
    assert ScratchDense(2, activation=keras.activations.softmax).activation is ops.softmax  # Keras's -> ours
    own = tf.math.softplus
    assert ScratchConv2D(2, 3, activation=own).activation is own  # a callable of your own stays
    with pytest.raises(ValueError, match=r"activation must be None, 'linear' or one of .*received activation='gelu'"):
        ScratchDense(2, activation="gelu")
    with pytest.raises(ValueError, match=r"Keras's 'elu' has no scratch version"):
        ScratchConv2D(2, 3, activation=keras.activations.elu)
