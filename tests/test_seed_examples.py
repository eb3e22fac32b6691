"""Golden tests: the worked examples of the seed notebooks, reproduced through our layers.

The five seed notebooks (text dumps in /work/shared/seeds/, referred to as "seed 000" ...
"seed 004" after their file-name prefix) derive convolution, pooling, flatten and dense layers
by hand and print worked examples. Every number asserted below is a literal copied from those
printouts; the computation goes through our scratch layers (``models.layers``) and, as a
cross-check that the seeds' numbers really are the standard definitions, through their Keras
built-in twins (the ``lib`` fixture runs every layer test once per implementation).

Conventions:

* Our layers are NHWC with Keras weight layouts: conv kernel ``(kh, kw, in, out)``, dense
  kernel ``(in, out)``. Seeds written in NCHW / ``(out, in, kh, kw)`` / ``(out, in)`` are
  converted in the test, and the conversion is spelled out where it happens.
* Backward passes use ``tf.GradientTape`` with ``output_gradients`` set to the seed's upstream
  delta, so each layer's hand-written gradient is checked against the seed's hand-derived one.
* Tolerances follow what the seed printed: numpy's default print keeps 8 decimals (``DEC8``,
  also for values it shows shorter because their trailing digits are zeros), scalars printed
  with ``repr`` carry ~17 significant digits (``REPR``, float64 throughout), small-integer
  examples are exact (``EXACT``, run in the default float32).
* Where a seed's code does something other than the textbook derivative, the test mirrors the
  seed's arithmetic explicitly and says so in a comment; it never bends a layer to match.
"""

import importlib
from types import SimpleNamespace

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

F64 = "float64"
F32 = "float32"

EXACT = {"atol": 1e-6, "rtol": 1e-6}  # exactly representable values (integers, quarters)
DEC8 = {"atol": 1e-7, "rtol": 1e-7}  # numpy array prints: rounded to 8 decimals
REPR = {"atol": 1e-13, "rtol": 1e-10}  # full-precision float64 scalars (repr / f-strings)
TIE = {"atol": 1e-12, "rtol": 1e-12}  # pooling only selects values: must be bit-for-bit-ish


# --------------------------------------------------------------------------- helpers


@pytest.fixture(params=["scratch", "keras"])
def lib(request):
    """The layer classes and the sigmoid under test: ours (models.layers, models.ops) or Keras's."""
    if request.param == "keras":
        return SimpleNamespace(
            Conv=keras.layers.Conv2D,
            MaxPool=keras.layers.MaxPooling2D,
            AvgPool=keras.layers.AveragePooling2D,
            Flatten=keras.layers.Flatten,
            Dense=keras.layers.Dense,
            sigmoid=keras.activations.sigmoid,
        )
    scratch = importlib.import_module("models.layers")
    return SimpleNamespace(
        Conv=scratch.ScratchConv2D,
        MaxPool=scratch.ScratchMaxPool2D,
        AvgPool=scratch.ScratchAvgPool2D,
        Flatten=scratch.ScratchFlatten,
        Dense=scratch.ScratchDense,
        sigmoid=importlib.import_module("models.ops").sigmoid,
    )


def conv(lib, kernel, bias=None, *, input_shape, strides=(1, 1), padding="valid", dtype=F64):
    """A conv layer carrying the given ``(kh, kw, in, out)`` kernel (and bias, if any)."""
    kernel = np.asarray(kernel, dtype)
    layer = lib.Conv(
        kernel.shape[3],
        kernel.shape[:2],
        strides=strides,
        padding=padding,
        use_bias=bias is not None,
        dtype=dtype,
    )
    layer.build(tuple(input_shape))
    layer.set_weights([kernel] if bias is None else [kernel, np.asarray(bias, dtype)])
    return layer


def dense(lib, kernel, bias=None, *, dtype=F64):
    """A dense layer carrying the given ``(in, out)`` kernel (and bias, if any)."""
    kernel = np.asarray(kernel, dtype)
    layer = lib.Dense(kernel.shape[1], use_bias=bias is not None, dtype=dtype)
    layer.build((1, kernel.shape[0]))
    layer.set_weights([kernel] if bias is None else [kernel, np.asarray(bias, dtype)])
    return layer


def forward(x, *steps, dtype=F64):
    """Run ``x`` through named ``(name, fn)`` steps under a persistent tape.

    Returns ``(tape, acts)`` where ``acts`` maps "x" and every step name to its output
    tensor, so gradients can be taken between any two recorded points.
    """
    acts = {"x": tf.constant(np.asarray(x, dtype))}
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(acts["x"])
        h = acts["x"]
        for name, fn in steps:
            h = acts[name] = fn(h)
    return tape, acts


def grads(tape, target, sources, upstream):
    """``d target / d sources`` as numpy arrays, with ``upstream`` = dL/d(target)."""
    upstream = tf.constant(np.asarray(upstream, target.dtype.as_numpy_dtype).reshape(target.shape))
    return [g.numpy() for g in tape.gradient(target, list(sources), output_gradients=upstream)]


def dense_grads(layer, x, upstream):
    """Input and kernel gradient of ``layer`` at input ``x`` for the upstream delta."""
    tape, acts = forward(x, ("y", layer))
    dx, dkernel = grads(tape, acts["y"], [acts["x"], layer.trainable_weights[0]], upstream)
    return dx, dkernel


def nchw_to_nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


def nhwc_to_nchw(a):
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


# --------------------------------------------------------------------------- seed 000
# A 5x5 image, one 2x2 kernel (no bias), 2x2 max pool, sigmoid, a 4 -> 2 fully connected
# layer (zero bias), then a given output delta and one gradient step with learning rate 0.5.

IMAGE_000 = [
    [0.51, 0.90, 0.88, 0.84, 0.05],
    [0.40, 0.62, 0.22, 0.59, 0.10],
    [0.11, 0.20, 0.74, 0.03, 0.14],
    [0.47, 0.00, 0.85, 0.70, 0.09],
    [0.76, 0.19, 0.72, 0.17, 0.57],
]
KERNEL_000 = [[-0.13, 0.15], [-0.51, 0.62]]
FC_WEIGHTS_000 = [[0.61, 0.82, 0.96, -1.0], [0.02, -0.5, 0.23, 0.17]]  # (out, in) as printed
DELTA_FC_000 = [[0.25, -0.15]]


def test_seed000_conv_pool_sigmoid_fc_forward_backward_update(lib):
    """seed 000, cells 23–43: forward, backward with the given FC delta, SGD step (eta 0.5).

    The seed computes in float64 and prints with numpy's 8 decimals (the convolution
    output shows 4 because the remaining digits are zeros).
    """
    image = np.asarray(IMAGE_000)[None, :, :, None]
    conv_layer = conv(lib, np.asarray(KERNEL_000)[:, :, None, None], input_shape=image.shape)
    # The seed's FC weights are (out, in); our kernel is (in, out): transpose.
    fc = dense(lib, np.asarray(FC_WEIGHTS_000).T, bias=np.zeros(2))
    tape, a = forward(
        image,
        ("conv", conv_layer),
        ("pool", lib.MaxPool(pool_size=(2, 2), dtype=F64)),
        ("sigmoid", lib.sigmoid),
        # One channel, so NHWC flatten order equals the seed's row-major flatten of the map.
        ("flat", lib.Flatten(dtype=F64)),
        ("fc", fc),
    )

    np.testing.assert_allclose(
        a["conv"].numpy()[0, :, :, 0],
        [
            [0.2491, -0.1648, 0.2652, -0.3406],
            [0.1089, 0.3092, -0.2989, 0.0098],
            [-0.224, 0.612, -0.0912, -0.2841],
            [-0.3309, 0.477, -0.2673, 0.1892],
        ],
        **DEC8,
    )
    np.testing.assert_allclose(a["pool"].numpy()[0, :, :, 0], [[0.3092, 0.2652], [0.612, 0.1892]], **DEC8)
    np.testing.assert_allclose(
        a["sigmoid"].numpy()[0, :, :, 0], [[0.57668998, 0.56591413], [0.64839689, 0.5471594]], **DEC8
    )
    np.testing.assert_allclose(a["fc"].numpy(), [[0.89113209, -0.02927488]], **DEC8)

    conv_kernel = conv_layer.trainable_weights[0]
    fc_kernel, fc_bias = fc.trainable_weights
    d_flat, d_pool, d_conv, d_image, d_kernel, d_fc_kernel, d_fc_bias = grads(
        tape,
        a["fc"],
        [a["flat"], a["pool"], a["conv"], a["x"], conv_kernel, fc_kernel, fc_bias],
        DELTA_FC_000,
    )
    # "fully connected delta input / weights / biases" (weights printed (out, in)).
    np.testing.assert_allclose(d_flat, [[0.1495, 0.28, 0.2055, -0.2755]], **DEC8)
    np.testing.assert_allclose(
        d_fc_kernel.T,
        [
            [0.14417249, 0.14147853, 0.16209922, 0.13678985],
            [-0.0865035, -0.08488712, -0.09725953, -0.08207391],
        ],
        **DEC8,
    )
    np.testing.assert_allclose(d_fc_bias, [0.25, -0.15], **DEC8)
    # "sigmoid delta" is the gradient at the sigmoid's input, i.e. the max-pool output.
    np.testing.assert_allclose(
        d_pool[0, :, :, 0], [[0.03649574, 0.06878349], [0.04684955, -0.06826229]], **DEC8
    )
    # "Max-pooling delta" is the gradient at the pool's input, i.e. the conv output.
    np.testing.assert_allclose(
        d_conv[0, :, :, 0],
        [
            [0.0, 0.0, 0.06878349, 0.0],
            [0.0, 0.03649574, 0.0, 0.0],
            [0.0, 0.04684955, 0.0, 0.0],
            [0.0, 0.0, 0.0, -0.06826229],
        ],
        **DEC8,
    )
    np.testing.assert_allclose(
        d_image[0, :, :, 0],
        [
            [0.0, 0.0, -0.00894185, 0.01031752, 0.0],
            [0.0, -0.00474445, -0.02960522, 0.04264576, 0.0],
            [0.0, -0.02470327, 0.02965479, 0.0, 0.0],
            [0.0, -0.02389327, 0.02904672, 0.0088741, -0.01023934],
            [0.0, 0.0, 0.0, 0.03481377, -0.04232262],
        ],
        **DEC8,
    )
    np.testing.assert_allclose(
        d_kernel[:, :, 0, 0], [[0.04474314, 0.09433226], [0.01082693, 0.06850172]], **DEC8
    )

    # Weight update "param - 0.5 * delta" applied to the layers' own variables.
    keras.optimizers.SGD(learning_rate=0.5).apply_gradients(
        zip([d_kernel, d_fc_kernel, d_fc_bias], [conv_kernel, fc_kernel, fc_bias], strict=True)
    )
    np.testing.assert_allclose(
        conv_kernel.numpy()[:, :, 0, 0], [[-0.15237157, 0.10283387], [-0.51541346, 0.58574914]], **DEC8
    )
    np.testing.assert_allclose(
        fc_kernel.numpy().T,
        [
            [0.53791375, 0.74926073, 0.87895039, -1.06839493],
            [0.06325175, -0.45755644, 0.27862977, 0.21103696],
        ],
        **DEC8,
    )
    np.testing.assert_allclose(fc_bias.numpy(), [-0.125, 0.075], **DEC8)


# --------------------------------------------------------------------------- seed 001
# NCHW numpy classes checked on tiny integer arrays; we convert to NHWC at the boundary.

X_4X4_001 = [[[[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]]]  # (1, 1, 4, 4)


def test_seed001_problem2_conv_two_filters_forward_backward(lib):
    """seed 001, cells 6 and 14–17 ([Problem 2]): 4x4 input, two 3x3 filters, given delta."""
    x = nchw_to_nhwc(X_4X4_001)
    # Seed weights are (out, in, kh, kw); ours (kh, kw, in, out).
    w = np.array(
        [
            [[[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]],
            [[[0.0, 0.0, 0.0], [0.0, -1.0, 1.0], [0.0, 0.0, 0.0]]],
        ]
    ).transpose(2, 3, 1, 0)
    # The seed's biases are zeros; keep a (zero) bias so the default layer config is used.
    layer = conv(lib, w, bias=np.zeros(2), input_shape=x.shape, dtype=F32)
    # Delta (2, 2, 2) is reshaped by the seed to NCHW (1, 2, 2, 2).
    delta = nchw_to_nhwc(np.array([[[-4, -4], [10, 11]], [[1, -7], [1, -11]]]).reshape(1, 2, 2, 2))

    tape, a = forward(x, ("y", layer), dtype=F32)
    np.testing.assert_allclose(
        nhwc_to_nchw(a["y"].numpy()), [[[[-4, -4], [-4, -4]], [[1, 1], [1, 1]]]], **EXACT
    )
    (dx,) = grads(tape, a["y"], [a["x"]], delta)
    np.testing.assert_allclose(
        nhwc_to_nchw(dx),
        [[[[0, 0, 0, 0], [0, -5, 4, -7], [0, 13, 27, -11], [0, -10, -11, 0]]]],
        **EXACT,
    )


@pytest.mark.parametrize(
    ("pool", "expected_forward", "expected_backward"),
    [
        pytest.param(
            "MaxPool",
            [[6, 8], [14, 16]],
            [[0, 0, 0, 0], [0, 1, 0, -1], [0, 0, 0, 0], [0, 2, 0, -2]],
            id="max-cell20",
        ),
        pytest.param(
            "AvgPool",
            [[3.5, 5.5], [11.5, 13.5]],
            [
                [0.25, 0.25, -0.25, -0.25],
                [0.25, 0.25, -0.25, -0.25],
                [0.5, 0.5, -0.5, -0.5],
                [0.5, 0.5, -0.5, -0.5],
            ],
            id="avg-cell22",
        ),
    ],
)
def test_seed001_pooling_forward_backward(lib, pool, expected_forward, expected_backward):
    """seed 001, cells 20 ([Problem 4], max) and 22 ([Problem 5], average): 2x2 / stride 2."""
    layer = getattr(lib, pool)(pool_size=(2, 2), strides=(2, 2), dtype=F32)
    # One channel: NCHW (1, 1, 4, 4) and NHWC (1, 4, 4, 1) hold the same values in order.
    tape, a = forward(nchw_to_nhwc(X_4X4_001), ("y", layer), dtype=F32)
    np.testing.assert_allclose(a["y"].numpy()[0, :, :, 0], expected_forward, **EXACT)
    (dx,) = grads(tape, a["y"], [a["x"]], [[[[1], [-1]], [[2], [-2]]]])
    np.testing.assert_allclose(dx[0, :, :, 0], expected_backward, **EXACT)


def test_seed001_flatten_forward_backward_nchw_vs_nhwc(lib):
    """seed 001, cell 23 ([Problem 6]): flatten of a (1, 2, 2, 3) NCHW array and its inverse.

    The seed flattens channels-first, giving 1..12. The same tensor in NHWC is (1, 2, 3, 2)
    and Keras-style flatten (ours included) walks H, W, then C, so it yields the channel-
    interleaved order [1, 7, 2, 8, ..., 6, 12]. That is the seed's vector under the
    NCHW -> NHWC index permutation, which is the meaningful check: every element keeps its
    value, only the order of the flat axis differs. The backward pass is the inverse
    reshape; fed the seed's delta permuted into our order, it reproduces the seed's
    gradient once transposed back to NCHW.
    """
    x_nchw = np.array([[[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]]])
    seed_forward = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    seed_delta = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])

    def to_nhwc_order(flat_nchw):
        return nchw_to_nhwc(flat_nchw.reshape(x_nchw.shape)).reshape(1, -1)

    layer = lib.Flatten(dtype=F32)
    tape, a = forward(nchw_to_nhwc(x_nchw), ("y", layer), dtype=F32)
    y = a["y"].numpy()
    np.testing.assert_allclose(y, [[1, 7, 2, 8, 3, 9, 4, 10, 5, 11, 6, 12]], **EXACT)
    np.testing.assert_allclose(y, to_nhwc_order(seed_forward), **EXACT)
    # Flattening the channels-first layout gives the seed's order exactly.
    np.testing.assert_allclose(layer(x_nchw.astype(np.float32)).numpy(), seed_forward, **EXACT)

    (dx,) = grads(tape, a["y"], [a["x"]], to_nhwc_order(seed_delta))
    np.testing.assert_allclose(
        nhwc_to_nchw(dx), [[[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]]], **EXACT
    )
    # The seed's delta as is (no permutation) comes back as a plain inverse reshape.
    (dx_raw,) = grads(tape, a["y"], [a["x"]], seed_delta)
    np.testing.assert_allclose(dx_raw, seed_delta.reshape(1, 2, 3, 2), **EXACT)


@pytest.mark.parametrize(
    ("input_hwc", "filters", "kernel", "stride", "padding", "expected_hw", "expected_params"),
    [
        # P=1 with F=3, S=1 keeps the size, which is Keras "same" padding.
        pytest.param((28, 28, 1), 8, 3, 1, "same", (28, 28), None, id="cells5-19-28x28-pad1"),
        pytest.param((144, 144, 3), 6, 3, 1, "valid", (142, 142), 168, id="problem10-layer1"),
        # The seed prints 31,152 = 3*3*24*48 + 48, but 3*3*24*48 is 10,368 (its 31,104 has an
        # extra factor 3); the correct count is 10,416, which is what we assert.
        pytest.param((60, 60, 24), 48, 3, 1, "valid", (58, 58), 10416, id="problem10-layer2"),
        # (20 - 3) / 2 + 1 = 9.5 is floored to 9, as the valid-padding formula does.
        pytest.param((20, 20, 10), 20, 3, 2, "valid", (9, 9), 1820, id="problem10-layer3"),
    ],
)
def test_seed001_conv_output_size_and_parameter_count(
    lib, input_hwc, filters, kernel, stride, padding, expected_hw, expected_params
):
    """seed 001, cells 5 and 19 ([Problems 1, 3]) and [Problem 10]: output sizes, params."""
    layer = lib.Conv(filters, (kernel, kernel), strides=(stride, stride), padding=padding)
    x = np.zeros((1, *input_hwc), np.float32)
    tape, a = forward(x, ("y", layer), dtype=F32)
    assert tuple(a["y"].shape) == (1, *expected_hw, filters)
    (dx,) = grads(tape, a["y"], [a["x"]], np.ones(a["y"].shape))
    assert dx.shape == x.shape  # cell 5 also prints d_x shape == input shape
    if expected_params is not None:
        assert layer.count_params() == expected_params


# --------------------------------------------------------------------------- seed 002
# Conv / pool / softmax worked on one image region. The image file and the (unseeded)
# random weights are not available, but the printed pieces below are self-contained.

FILTERS_002 = np.array(  # filters 0..5 of 8, (filters, 3, 3); 6 and 7 were cut off the print
    [
        [[0.01267095, 0.20470475, 0.09748474], [0.05568934, -0.03303646, -0.01112282],
         [0.10758389, 0.02007382, 0.07619285]],
        [[-0.08498716, -0.00374426, -0.12824152], [-0.01429454, 0.00819415, -0.08061402],
         [0.0437479, -0.00196678, 0.10243619]],
        [[-0.1033074, 0.08319609, -0.13292061], [-0.04424397, -0.06655614, 0.15981453],
         [0.20135892, -0.09759611, 0.14350246]],
        [[-0.01883311, -0.13721395, -0.09912846], [-0.09317714, 0.07193293, 0.19069769],
         [-0.03538911, 0.13244822, 0.00865655]],
        [[-0.00283871, 0.12421434, 0.08159141], [-0.03592091, -0.17254956, -0.07766537],
         [0.10526048, -0.10400888, -0.01105415]],
        [[-0.21682431, 0.07806685, 0.07949128], [-0.0224462, 0.10101604, -0.10534961],
         [0.05890768, -0.13262552, 0.16772724]],
    ]
)
# Conv output at (0, 0) and (0, 1), all 8 channels (cells 68, 77); rows 0 and 1 are equal.
CONV_ROW0_002 = [
    [29.21824647, -8.80394794, 7.929368, 1.28712125, -5.21329086, 0.66829655, 13.87566865, -27.0219215],
    [29.45810469, -8.85865404, 7.95619016, 1.16211095, -5.19757136, 0.50341951, 13.76903166, -27.30852857],
]


def test_seed002_conv_first_two_regions(lib):
    """seed 002, cells 39, 49–68: regions (0, 0) and (0, 1) times the printed filters 0..5.

    The image is the channel mean of a uint8 picture, so the printed 54.33333333,
    55.33333333, 55.66666667 are 163/3, 166/3, 167/3; rows 0..2 of columns 0..3 are
    equal. The filters are printed to 8 decimals, hence atol 1e-5 on outputs of size ~30.
    """
    strip = np.tile(np.array([163, 166, 167, 167]) / 3, (3, 1))[None, :, :, None]  # (1, 3, 4, 1)
    kernel = FILTERS_002.transpose(1, 2, 0)[:, :, None, :]  # (3, 3, 1, 6)
    layer = conv(lib, kernel, input_shape=strip.shape)
    y = layer(strip).numpy()
    assert y.shape == (1, 1, 2, 6)
    np.testing.assert_allclose(y[0, 0], np.asarray(CONV_ROW0_002)[:, :6], atol=1e-5, rtol=1e-7)
    # Cell 64: the single sum for filter 0 at region (0, 0).
    np.testing.assert_allclose(y[0, 0, 0, 0], 29.218246471288303, atol=1e-5, rtol=1e-7)


def test_seed002_max_pool_first_block_and_ties(lib):
    """seed 002, cells 77–85 and 241–242: 2x2 max pool of the conv block at (0, 0).

    The block's two rows are identical, so every channel has a tie for the maximum. The
    seed's own routing (cell 244) compares only the block's first pixel and then writes the
    gradient into all four pixels; that is not reproduced. A mask `x == max` (seeds 000
    and 003) would send the full gradient to each tied pixel and so double it. We check the
    forward against the seed and, for the backward, that the gradient per window and
    channel sums to the upstream value and lands only on maximal pixels (Keras picks one).
    """
    block = np.asarray([CONV_ROW0_002, CONV_ROW0_002])[None]  # (1, 2, 2, 8)
    tape, a = forward(block, ("y", lib.MaxPool(pool_size=(2, 2), dtype=F64)))
    np.testing.assert_allclose(
        a["y"].numpy()[0, 0, 0],
        [29.45810469, -8.80394794, 7.95619016, 1.28712125, -5.19757136, 0.66829655, 13.87566865, -27.0219215],
        **TIE,
    )
    (dx,) = grads(tape, a["y"], [a["x"]], np.ones((1, 1, 1, 8)))
    np.testing.assert_allclose(dx.sum(axis=(0, 1, 2)), np.ones(8), **TIE)
    is_max = block == block.max(axis=(1, 2), keepdims=True)
    assert np.all(dx[~is_max] == 0.0)


def test_seed002_softmax_cross_entropy_and_gradients():
    """seed 002, cells 105–161: softmax of the printed logits, log loss for label 0, grads.

    The seed's dL/dz is (dL/dsoftmax) * (d softmax_0 / dz) element-wise, which is right
    only for entry 0 (its other entries print as -0.); the full gradient is softmax - onehot.
    Logits are printed to 8 decimals, so the results carry ~1e-8 of rounding.
    """
    logits = tf.constant(
        [[0.35333665, 0.40912535, -0.22820773, 0.35323881, 0.18017952,
          -1.38450016, -0.50026854, -0.59583091, 0.06343068, 0.16050995]],
        tf.float64,
    )
    onehot = tf.one_hot([0], 10, dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        # tf.identity drops the `_keras_logits` tag Keras puts on softmax outputs; with it,
        # the loss would silently be computed from the logits and dL/dprobs would be None.
        probs = tf.identity(keras.activations.softmax(logits))
        prob0 = probs[:, 0]
        loss = keras.losses.categorical_crossentropy(onehot, probs)
        # The seed's log loss -sum(y log p). Keras's version first renormalises p / sum(p),
        # which adds 1 / sum(p) = 1 to every dL/dp (same value, same gradient along the
        # simplex), so the seed's dL/dp = -1 / p_0 is taken from the literal formula.
        seed_loss = -keras.ops.sum(onehot * keras.ops.log(probs), axis=-1)
        loss_from_logits = keras.losses.categorical_crossentropy(onehot, logits, from_logits=True)
    np.testing.assert_allclose(
        probs.numpy()[0],
        [0.1424681, 0.15064209, 0.07964456, 0.14245416, 0.11981645,
         0.02506021, 0.06067386, 0.05514414, 0.10661371, 0.11748273],
        **DEC8,
    )
    assert int(tf.argmax(probs, axis=1)[0]) == 1  # cell 113: predicted class
    np.testing.assert_allclose(loss.numpy()[0], 1.9486371983952187, **DEC8)
    np.testing.assert_allclose(loss_from_logits.numpy()[0], 1.9486371983952187, **DEC8)
    np.testing.assert_allclose(seed_loss.numpy()[0], 1.9486371983952187, **DEC8)
    d_probs = tape.gradient(seed_loss, probs).numpy()[0]
    np.testing.assert_allclose(d_probs[0], -7.019115397849437, **DEC8)  # -1 / softmax_0
    d_softmax0 = tape.gradient(prob0, logits).numpy()[0]  # row 0 of the softmax Jacobian
    np.testing.assert_allclose(
        d_softmax0,
        [0.12217094, -0.02146169, -0.01134681, -0.02029517, -0.01707002,
         -0.00357028, -0.00864409, -0.00785628, -0.01518905, -0.01673754],
        **DEC8,
    )
    seed_d_logits = d_probs * d_softmax0  # the seed's dL_db (cells 156, 161)
    np.testing.assert_allclose(seed_d_logits, [-0.8575319] + [0.0] * 9, **DEC8)
    d_logits = tape.gradient(loss_from_logits, logits).numpy()[0]
    np.testing.assert_allclose(d_logits[0], -0.8575319, **DEC8)
    np.testing.assert_allclose(d_logits, probs.numpy()[0] - onehot.numpy()[0], **REPR)


# --------------------------------------------------------------------------- seed 003
# NHWC numpy conv / max pool on inputs from np.random.seed(...) + randn, which numpy
# reproduces exactly; the seed pads explicitly (pad=1), which is not Keras "same" for the
# kernels involved, so we pad with tf.pad in front of a "valid" layer.


def pad1(x):
    return tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])


def test_seed003_conv_forward_padded_stride2(lib):
    """seed 003, cells 68–70: 1x1 conv, pad 1, stride 2, on seeded random inputs."""
    np.random.seed(0)
    a_prev = np.random.randn(1, 1, 1, 1)
    w = np.random.randn(1, 1, 1, 1)
    b = np.random.randn(1, 1, 1, 1)
    np.testing.assert_allclose(
        [a_prev.item(), w.item(), b.item()], [1.76405235, 0.40015721, 0.97873798], **DEC8
    )
    layer = conv(lib, w, b.reshape(1), input_shape=(1, 3, 3, 1), strides=(2, 2))
    y = layer(pad1(a_prev)).numpy()
    assert y.shape == (1, 2, 2, 1)
    # The 1x1 filter at stride 2 only lands on padding, so every output is the bias.
    np.testing.assert_allclose(y, np.full((1, 2, 2, 1), 0.97873798), **DEC8)

    a_prev = np.random.randn(2, 9, 7, 3)
    w = np.random.randn(5, 5, 3, 4)
    b = np.random.randn(1, 1, 1, 4)
    layer = conv(lib, w, b.reshape(4), input_shape=(2, 11, 9, 3), strides=(2, 2))
    assert tuple(layer(pad1(a_prev)).shape) == (2, 4, 3, 4)


def test_seed003_conv_backward_as_called_in_the_seed(lib):
    """seed 003, cells 77–78: conv_backward fed the forward output as its upstream gradient.

    Cell 78 calls the forward pass with the global ``filter_size`` in the stride slot; the
    printed result is only consistent with ``filter_size == 3`` (left over from an earlier
    cell), i.e. a 1x1 conv, pad 1, stride 3 -> Y of shape (1, 3, 3, 3). The backward
    function then loops with the global ``stride = 1``: that is the input gradient of the
    same 1x1 conv at stride 1 over the padded input (a 7x7 output) whose upstream delta is
    Y in the top-left 3x3 corner and zero elsewhere. We mirror exactly that.
    """
    np.random.seed(1)
    a_prev = np.random.randn(1, 5, 5, 3)
    w = np.random.randn(1, 1, 3, 3)
    b = np.random.randn(1, 1, 1, 3).reshape(3)

    stride3 = conv(lib, w, b, input_shape=(1, 7, 7, 3), strides=(3, 3))
    y = stride3(pad1(a_prev)).numpy()
    assert y.shape == (1, 3, 3, 3)

    stride1 = conv(lib, w, b, input_shape=(1, 7, 7, 3), strides=(1, 1))
    tape, a = forward(a_prev, ("padded", pad1), ("y", stride1))
    upstream = np.zeros((1, 7, 7, 3))
    upstream[:, :3, :3, :] = y
    (dx,) = grads(tape, a["y"], [a["x"]], upstream)
    assert dx.shape == (1, 5, 5, 3)
    zero = [0.0, 0.0, 0.0]
    border = [-0.99273423, 0.28542074, -0.29261403]  # W @ b: the output at a padded pixel
    # Rows 0..2 are printed in full (the dump cuts off inside row 3).
    np.testing.assert_allclose(
        dx[0, :3],
        [
            [[-5.49685242, 1.43976779, -0.65685065], border, zero, zero, zero],
            [border, border, zero, zero, zero],
            [zero, zero, zero, zero, zero],
        ],
        **DEC8,
    )


def test_seed003_max_pool_forward_3x3_stride1(lib):
    """seed 003, cells 42–43: 3x3 max pool, stride 1, on randn(1, 5, 5, 3) after seed(1)."""
    np.random.seed(1)
    a_prev = np.random.randn(1, 5, 5, 3)
    np.testing.assert_allclose(a_prev[0, 0, :2], [[1.62434536, -0.61175641, -0.52817175],
                                                  [-1.07296862, 0.86540763, -2.3015387]], **DEC8)
    tape, a = forward(a_prev, ("y", lib.MaxPool(pool_size=(3, 3), strides=(1, 1), dtype=F64)))
    y = a["y"].numpy()
    assert y.shape == (1, 3, 3, 3)
    # The seed asserts these two with atol 0.01; they are elements of the printed input.
    np.testing.assert_allclose(y[0, 0, 0, :2], [1.74481176, 0.90159072], **DEC8)


def test_seed003_max_pool_backward_overlapping_windows(lib):
    """seed 003, cells 57 and 66: 2x2 max pool, stride 1 (overlapping), upstream randn.

    Overlapping windows that share a maximum accumulate their gradients there, e.g.
    0.63296787 = 0.90085595 + (-0.26788808).
    """
    np.random.seed(1)
    a_prev = np.random.randn(1, 4, 3, 2)
    upstream = np.random.randn(1, 3, 2, 2)
    np.testing.assert_allclose(upstream[0, 0, 0], [0.90085595, -0.68372786], **DEC8)
    tape, a = forward(a_prev, ("y", lib.MaxPool(pool_size=(2, 2), strides=(1, 1), dtype=F64)))
    assert tuple(a["y"].shape) == (1, 3, 2, 2)
    (dx,) = grads(tape, a["y"], [a["x"]], upstream)
    np.testing.assert_allclose(
        dx[0],
        [
            [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
            [[0.63296787, 0.0], [0.0, -1.48589535], [-0.81455098, 0.0]],
            [[0.0, 0.0], [-1.35841883, 0.0], [0.0, 0.0]],
            [[0.0, 0.0], [0.0, -0.85787024], [0.0, 0.0]],
        ],
        **DEC8,
    )


# --------------------------------------------------------------------------- seed 004
# 5x5 input -> 2x2 conv (no bias) -> 2x2 max pool -> flatten -> sigmoid -> dense 4->2
# (no bias) -> sigmoid -> dense 2->2 (no bias) -> sigmoid, weights from np.random.seed(0),
# error E = (O1 - 0)^2 + (O2 - 1)^2, learning rate 0.001; two manual passes (cells 1–15).
# The manual cells are what print numbers; the SimpleCNN class (cells 16–19, 364024
# iterations) and the PyTorch model (unseeded init) are not reproduced.

INPUT_004 = np.array(
    [
        [0.51, 0.90, 0.88, 0.84, 0.05],
        [0.40, 0.62, 0.22, 0.59, 0.10],
        [0.11, 0.20, 0.74, 0.33, 0.14],
        [0.47, 0.01, 0.85, 0.70, 0.09],
        [0.76, 0.19, 0.72, 0.17, 0.57],
    ]
)[None, :, :, None]
TARGETS_004 = np.array([[0.0, 1.0]])
LR_004 = 0.001


class Seed004Net:
    """Seed 004's network built from our layers with its np.random.seed(0) weights."""

    def __init__(self, lib):
        self.sigmoid = lib.sigmoid
        np.random.seed(0)
        self.w_conv = np.random.randn(2, 2)
        self.w_1_to_4 = np.random.randn(4)
        self.w_5_to_8 = np.random.randn(4)
        self.w_9_to_12 = np.random.randn(4)
        self.conv = conv(lib, self.w_conv[:, :, None, None], input_shape=INPUT_004.shape)
        self.pool = lib.MaxPool(pool_size=(2, 2), dtype=F64)
        self.flatten = lib.Flatten(dtype=F64)
        # H1 = sig(s . w1..4), H2 = sig(s . w5..8): kernel columns are the two neurons.
        self.hidden = dense(lib, np.stack([self.w_1_to_4, self.w_5_to_8], axis=1))
        # O1 = sig(w9 H1 + w10 H2), O2 = sig(w11 H1 + w12 H2): (in, out) = [[w9, w11], [w10, w12]].
        self.out = dense(lib, self.w_9_to_12.reshape(2, 2).T)
        self.conv_kernel = self.conv.trainable_weights[0]
        self.hidden_kernel = self.hidden.trainable_weights[0]
        self.out_kernel = self.out.trainable_weights[0]

    def forward(self):
        return forward(
            INPUT_004,
            ("feature_map", self.conv),
            ("pooled", self.pool),
            ("flat", self.flatten),
            ("s", self.sigmoid),
            ("net_h", self.hidden),
            ("h", self.sigmoid),
            ("net_o", self.out),
            ("o", self.sigmoid),
        )

    def step(self, variable, gradient):
        # Plain float64 "w -= lr * grad". (Keras optimizers keep the learning rate as a
        # float32 variable, and float32(0.001) is off by 5e-8 relative, which would show
        # at the 16 digits the seed prints.)
        variable.assign_sub(LR_004 * np.asarray(gradient))


def sum_squared_error(o, targets):
    """The seed's error and its gradient dE/dO: per-neuron errors, total, 2 (O - t).

    The seed calls it MSE but sums the two squared errors without dividing by n, so the
    total is 2 x Keras's mean_squared_error over the two outputs.
    """
    o = tf.constant(o)
    with tf.GradientTape() as tape:
        tape.watch(o)
        total = 2.0 * keras.losses.mean_squared_error(tf.constant(targets, o.dtype), o)
    per_neuron = keras.ops.square(o - targets).numpy()
    return per_neuron, total.numpy(), tape.gradient(total, o).numpy()


def assert_seed004_forward(a, feature_map, pooled, s, h, o, per_neuron, total):
    """A Seed004Net forward pass against the seed's printed values: conv feature map, 2x2 max pool
    (flattened in the same order), sigmoid, hidden and output layers, per-neuron and total error."""
    np.testing.assert_allclose(a["feature_map"].numpy()[0, :, :, 0], feature_map, **DEC8)
    np.testing.assert_allclose(a["pooled"].numpy()[0, :, :, 0], pooled, **DEC8)
    np.testing.assert_allclose(a["flat"].numpy(), np.reshape(pooled, (1, 4)), **DEC8)
    np.testing.assert_allclose(a["s"].numpy(), [s], **DEC8)
    np.testing.assert_allclose(a["h"].numpy(), [h], **REPR)
    np.testing.assert_allclose(a["o"].numpy(), [o], **REPR)
    actual_per_neuron, actual_total, _ = sum_squared_error(a["o"].numpy(), TARGETS_004)
    np.testing.assert_allclose(actual_per_neuron, [per_neuron], **REPR)
    np.testing.assert_allclose(actual_total, [total], **REPR)


def seed004_output_layer_step(net, h, dsig, o):
    """The seed's output-layer gradients, update and dE/dH, quirks mirrored (cells 10–11, 15).

    * dE1/dO1 = 2 (O1 - t1) and dE2/dO2 = 2 (O2 - t2) are the true error gradients, but the
      seed's "dE2/dO1" = 2 (O1 - t2) and "dE1/dO2" = 2 (O2 - t1) use the other neuron's
      target: they are the error gradient against swapped targets. Its grad_w9 / grad_w12
      are true backprop; grad_w10 / grad_w11 come from the swapped-target gradient.
    * The weights w9..w12 are updated in place first, and dE/dH is then computed from the
      *updated* weights as dE/dH1 = O1'(w9 dE1/dO1 + w11 dE1/dO2) and
      dE/dH2 = O2'(w10 dE2/dO1 + w12 dE2/dO2), where Oi' = Oi (1 - Oi): each H takes the
      sigmoid slope of the output neuron with its own index. True backprop would be
      dE/dHj = sum_i w_ji 2 (Oi - ti) Oi'. We get it as two input gradients of the output
      dense layer, each for an upstream delta assembled the seed's way.

    ``h`` and ``dsig`` (= Oi') are passed in because the seed's second pass reuses the ones
    from its first pass.
    """
    _, _, d_true = sum_squared_error(o, TARGETS_004)
    _, _, d_swapped = sum_squared_error(o, TARGETS_004[:, ::-1])
    _, k_true = dense_grads(net.out, h, dsig * d_true)
    _, k_swapped = dense_grads(net.out, h, dsig * d_swapped)
    grad = np.where(np.eye(2, dtype=bool), k_true, k_swapped)  # [[w9, w11], [w10, w12]]
    net.step(net.out_kernel, grad)
    de_dh1 = dense_grads(net.out, h, dsig[0, 0] * np.array([[d_true[0, 0], d_swapped[0, 1]]]))[0]
    de_dh2 = dense_grads(net.out, h, dsig[0, 1] * np.array([[d_swapped[0, 0], d_true[0, 1]]]))[0]
    de_dh = np.array([[de_dh1[0, 0], de_dh2[0, 1]]])
    return d_true, d_swapped, grad, de_dh


def assert_w9_to_w12(kernel, w9, w10, w11, w12, tol):
    np.testing.assert_allclose(kernel, [[w9, w11], [w10, w12]], **tol)


def test_seed004_first_forward_pass(lib):
    """seed 004, cells 1–9: initial weights, forward pass and error."""
    net = Seed004Net(lib)
    np.testing.assert_allclose(net.w_conv, [[1.76405235, 0.40015721], [0.97873798, 2.2408932]], **DEC8)
    np.testing.assert_allclose(
        np.concatenate([net.w_1_to_4, net.w_5_to_8, net.w_9_to_12]),
        [1.8675579901499675, -0.977277879876411, 0.9500884175255894, -0.1513572082976979,
         -0.10321885179355784, 0.41059850193837233, 0.144043571160878, 1.454273506962975,
         0.7610377251469934, 0.12167501649282841, 0.44386323274542566, 0.33367432737426683],
        **REPR,
    )
    _, a = net.forward()
    assert_seed004_forward(
        a,
        feature_map=[
            [3.04065716, 3.03959951, 3.42594746, 2.30335656],
            [1.50955823, 3.0357556, 2.08794513, 1.71751519],
            [0.75649298, 2.5634734, 3.83800314, 1.52495626],
            [2.00271675, 2.15717747, 2.86519773, 2.71454537],
        ],
        pooled=[[3.04065716, 3.42594746], [2.5634734, 3.83800314]],
        s=[0.95437745, 0.96850569, 0.92847347, 0.97891748],
        h=[0.8277581918035074, 0.8648898321761768],
        o=[0.6759432999019798, 0.6583619381178293],
        per_neuron=[0.45689934468237775, 0.1167165653266059],
        total=0.5736159100089837,
    )


def test_seed004_first_backward_pass_and_update(lib):
    """seed 004, cells 10–12: gradients and updates of w9..w12, w1..w8 and the conv kernel."""
    net = Seed004Net(lib)
    tape, a = net.forward()
    h, o = a["h"].numpy(), a["o"].numpy()
    (dsig,) = grads(tape, a["o"], [a["net_o"]], np.ones((1, 2)))  # Oi (1 - Oi)
    np.testing.assert_allclose(dsig, [[0.21904395521960202, 0.22492149655556481]], **REPR)

    d_true, d_swapped, grad_out, de_dh = seed004_output_layer_step(net, h, dsig, o)
    np.testing.assert_allclose(d_true, [[1.3518865998039595, -0.6832761237643414]], **REPR)
    np.testing.assert_allclose(d_swapped, [[-0.6481134001960405, 1.3167238762356586]], **REPR)
    assert_w9_to_w12(grad_out, 0.24511789785387136, -0.12278436404679686,
                     0.24514845617318098, -0.13291928641939774, REPR)
    # Cross-check: the true-backprop entries w9 and w12 are the gradient of E itself.
    (dE_dkernel,) = grads(tape, a["o"], [net.out_kernel], d_true)
    np.testing.assert_allclose(np.diag(dE_dkernel), np.diag(grad_out), **REPR)
    assert_w9_to_w12(net.out_kernel.numpy(), 0.7607926072491396, 0.12179780085687521,
                     0.4436180842892525, 0.33380724666068623, REPR)
    np.testing.assert_allclose(de_dh, [[0.35323638354339076, -0.06905569216708796]], **REPR)

    # w1..w8: the sigmoid + dense backward of the hidden layer for upstream dE/dH.
    grad_hidden, delta_hidden = grads(tape, a["h"], [net.hidden_kernel, a["net_h"]], de_dh)
    np.testing.assert_allclose(
        grad_hidden.T,
        [[0.048064857946680715, 0.04877639171724259, 0.046760268132586026, 0.0493007558027989],
         [-0.007701378664579531, -0.007815386928284625, -0.0074923456914364065, -0.00789940520179029]],
        **REPR,
    )
    net.step(net.hidden_kernel, grad_hidden)
    np.testing.assert_allclose(
        net.hidden_kernel.numpy().T,
        [[1.8675099252920209, -0.9773266562681283, 0.9500416572574568, -0.1514065090535007],
         [-0.10321115041489326, 0.4106063173253006, 0.14405106350656943, 1.4542814063681768]],
        **REPR,
    )

    # The seed backpropagates to the sigmoid features through the w1..w8 it has just
    # updated in place (they alias the arrays it multiplies with): input gradient of the
    # hidden layer with its *updated* kernel. (The old kernel differs by ~2e-6 here.)
    grad_s, _ = dense_grads(net.hidden, a["s"].numpy(), delta_hidden)
    np.testing.assert_allclose(grad_s, [[0.09488538, -0.05253404, 0.04668407, -0.01936058]], **DEC8)
    # From here it is plain backprop through sigmoid, flatten, max pool and the conv.
    (grad_flat,) = grads(tape, a["s"], [a["flat"]], grad_s)
    np.testing.assert_allclose(grad_flat, [[0.00413142, -0.00160242, 0.00310031, -0.00039956]], **DEC8)
    (grad_fm,) = grads(tape, a["flat"], [a["feature_map"]], grad_flat)
    np.testing.assert_allclose(
        grad_fm[0, :, :, 0],
        [
            [0.00413142, 0.0, -0.00160242, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 0.00310031, -0.00039956, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ],
        **DEC8,
    )
    (grad_conv,) = grads(tape, a["feature_map"], [net.conv_kernel], grad_fm)
    np.testing.assert_allclose(
        grad_conv[:, :, 0, 0], [[0.00102128, 0.00453462], [0.00099141, 0.00397162]], **DEC8
    )
    net.step(net.conv_kernel, grad_conv)
    np.testing.assert_allclose(
        net.conv_kernel.numpy()[:, :, 0, 0], [[1.76405132, 0.40015267], [0.97873699, 2.24088923]], **DEC8
    )


def test_seed004_second_forward_and_backward_pass(lib):
    """seed 004, cells 13–15 and the closing list of updated weights (item 30).

    The second backward pass reuses first-pass quantities: the sigmoid slopes Oi (1 - Oi)
    and the hidden outputs H for w9..w12 (only dE/dO is recomputed), while w1..w8 use the
    second-pass H and sigmoid features. The conv kernel is not updated again and the conv
    gradients it prints are the stale first-pass ones, so they are not re-asserted here.
    """
    net = Seed004Net(lib)
    tape1, a1 = net.forward()
    h1, o1 = a1["h"].numpy(), a1["o"].numpy()
    (dsig1,) = grads(tape1, a1["o"], [a1["net_o"]], np.ones((1, 2)))
    _, _, _, de_dh = seed004_output_layer_step(net, h1, dsig1, o1)
    grad_hidden, delta_hidden = grads(tape1, a1["h"], [net.hidden_kernel, a1["net_h"]], de_dh)
    net.step(net.hidden_kernel, grad_hidden)
    grad_s, _ = dense_grads(net.hidden, a1["s"].numpy(), delta_hidden)
    (grad_fm,) = grads(tape1, a1["s"], [a1["feature_map"]], grad_s)
    (grad_conv,) = grads(tape1, a1["feature_map"], [net.conv_kernel], grad_fm)
    net.step(net.conv_kernel, grad_conv)

    tape2, a2 = net.forward()
    assert_seed004_forward(
        a2,
        feature_map=[
            [3.0406497, 3.03959311, 3.42594019, 2.30335449],
            [1.5095541, 3.03575084, 2.08794019, 1.71751325],
            [0.75649146, 2.56346646, 3.83799727, 1.52495424],
            [2.00271472, 2.15717056, 2.8651923, 2.71454182],
        ],
        pooled=[[3.0406497, 3.42594019], [2.56346646, 3.83799727]],
        s=[0.95437713, 0.96850547, 0.92847301, 0.97891736],
        h=[0.8277317284803233, 0.8648932569716911],
        o=[0.6759177984208319, 0.6583397696237019],
        per_neuron=[0.45686487022206435, 0.1167317130207851],
        total=0.5735965832428495,
    )

    # Output layer: second-pass O for dE/dO, first-pass H and slopes (the seed's stale reuse).
    d_true, d_swapped, grad_out, de_dh2 = seed004_output_layer_step(net, h1, dsig1, a2["o"].numpy())
    np.testing.assert_allclose(d_true, [[1.3518355968416638, -0.6833204607525962]], **REPR)
    np.testing.assert_allclose(d_swapped, [[-0.6481644031583362, 1.3166795392474038]], **REPR)
    assert_w9_to_w12(grad_out, 0.24510865022991823, -0.12279402650137365,
                     0.24514020148560509, -0.1329279113963812, REPR)
    assert_w9_to_w12(net.out_kernel.numpy(), 0.7605474985989097, 0.12192059488337659,
                     0.4433729440877669, 0.33394017457208264, REPR)
    np.testing.assert_allclose(de_dh2, [[0.35308029521889095, -0.06909875004418603]], **REPR)

    # Hidden layer: second-pass H and sigmoid features.
    (grad_hidden2,) = grads(tape2, a2["h"], [net.hidden_kernel], de_dh2)
    np.testing.assert_allclose(
        grad_hidden2.T,
        [[0.048049447923111416, 0.04876075900404932, 0.04674526906071064, 0.04928496021098562],
         [-0.007706013212102794, -0.007820090955439073, -0.007496853274184514, -0.007904160629515565]],
        **REPR,
    )
    net.step(net.hidden_kernel, grad_hidden2)
    np.testing.assert_allclose(
        net.hidden_kernel.numpy().T,
        [[1.8674618758440977, -0.9773754170271324, 0.9499949119883961, -0.15145579401371168],
         [-0.10320344440168115, 0.4106141374162561, 0.14405856035984363, 1.4542893105288064]],
        **REPR,
    )
