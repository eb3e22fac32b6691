"""Why did the model say 7? Maps of the input pixels (or regions) behind one class's score: Saliency, SmoothGrad,
Integrated Gradients and Grad-CAM, for every architecture, builtin and scratch.

Each method is one function of ``(model, x, classes)``: ``x`` a batch of normalised images ``(N, H, W, C)`` as the
model takes them, ``classes`` the class explained for each image (``(N,)``), the answer an ``(N, H, W)`` map. The
score ``S_c`` explained is the class's **logit**, the input of the last layer's softmax (saturated probabilities
have vanishing gradients; Grad-CAM and Integrated Gradients are defined on the pre-softmax score). Gradients come
from ``tf.GradientTape`` on the model's own layers, run in order (``ClassScores``): for a scratch model they flow
through the hand-derived backward passes of ``models/layers.py``, for a builtin one through TensorFlow's; the twins
with the same weights give the same maps (tests/test_explain.py). ``map_function`` gives a method as TensorFlow ops on
tensors, for a ``tf.function`` that runs it as one traced graph (the demo page: a few milliseconds an image instead
of tens in eager mode).

Written here, on ``tf.GradientTape``, because the packaged Keras explainers do not fit (PyPI, checked for this
module): tf-explain 0.3.1 (its last release, November 2021; classifiers Python 3.6-3.7) is written for tf.keras 2;
tf-keras-vis 0.8.7 (its last release, March 2024) is "for tf.keras", the Keras 2 API that TensorFlow 2.16+ keeps
only as the separate tf_keras package, not the Keras 3 this project uses; eli5 has Keras 3 support (2025) for
Grad-CAM alone. Each method here is a few lines of gradient code, and no new dependency.

Where a map's pixels come from, per method (``∇`` = the gradient with respect to the input):

- saliency (Simonyan et al. 2014):        ``M = max_channels |∇S_c(x)|``
- smoothgrad (Smilkov et al. 2017):       ``M = max_channels |(1/n) Σ_i ∇S_c(x + ε_i)|``, ``ε_i ~ N(0, σ²)``
- ig, Integrated Gradients (Sundararajan et al. 2017), signed:
  ``M = Σ_channels (x − x') ⊙ ∫₀¹ ∇S_c(x' + α(x − x')) dα``; it sums to ``S_c(x) − S_c(x')`` (completeness)
- gradcam (Selvaraju et al. 2017) on conv feature maps ``A^k``:
  ``M = ReLU(Σ_k α_k A^k)``, ``α_k = mean_ij ∂S_c/∂A^k_ij``, placed on the input pixels by receptive fields
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

METHODS = ("saliency", "smoothgrad", "ig", "gradcam")
TITLES = {"saliency": "Saliency", "smoothgrad": "SmoothGrad", "ig": "Integrated Gradients", "gradcam": "Grad-CAM"}
SIGNED = frozenset({"ig"})  # maps with negative evidence (the others are >= 0)


def blank(mean, std) -> np.ndarray:
    """Integrated Gradients' baseline ``x'``: the blank image as the model sees it, i.e. a 0-intensity pixel after
    normalisation, ``(0 − mean) / std`` per channel (MNIST: −0.4242), shape ``(C,)``, broadcast over the image.
    For digits that is the empty page: the attributions say how the ink moved the score from "nothing drawn"."""
    return (0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


# --- the score: a class's logit, and a conv layer's feature maps -----------------------------------------------


def is_softmax(layer) -> bool:
    return layer.get_config().get("activation") == "softmax"


def feature_layer(model: keras.Model):
    """Grad-CAM's layer: the last conv layer whose output is larger than 1x1 (in LeNet-5 classic, C5's output is
    1x1: its map would be one number, so C3 is used); None for a model without conv layers."""
    from models.architectures import conv_layers

    spatial = [layer for layer in conv_layers(model) if np.prod(layer.output.shape[1:3]) > 1]
    return spatial[-1] if spatial else None


class ClassScores:
    """A Sequential model (every architecture of models/architectures.py) run layer by layer: ``x -> (logits
    (N, classes), the output of layer)`` (the model's output when ``layer`` is None), each step recorded by the
    caller's ``tf.GradientTape``. A final softmax is left out: a separate softmax layer is skipped, a Dense one
    (builtin or scratch) is run as a copy of itself with a linear activation and the same weights (copied when the
    scorer is made: make another after the weights change). Layer by layer, not through the layers' symbolic
    outputs: those of a loaded Sequential model need not belong to the graph its output comes from."""

    def __init__(self, model: keras.Model, layer=None):
        *body, last = model.layers
        self.layer, self.head = layer, None
        self.layers = body if is_softmax(last) else [*body, last]
        if is_softmax(last) and last.weights:  # a Dense layer's softmax (an Activation layer's is simply skipped)
            self.head = type(last).from_config({**last.get_config(), "activation": "linear",
                                                "name": f"{last.name}_logits"})
            self.head.build((None, last.kernel.shape[0]))
            self.head.set_weights(last.get_weights())

    def __call__(self, x):
        h, features = x, None
        for current in self.layers:
            h = current(h, training=False)
            if current is self.layer:
                features = h
        if self.head is not None:
            h = self.head(h)
        return h, h if self.layer is None else features


def class_gradients(scorer: ClassScores, x, classes, wrt: str = "input"):
    """Tensors: ``S_c`` per image (N,), the gradient of ``Σ_n S_{c_n}(x_n)`` with respect to the input ``x``
    (``wrt="input"``) or to the scorer's second output (``"features"``), and that output: per image, its own
    score's gradient. ``x`` (N, H, W, C) float32 and ``classes`` (N,) int32 are tensors."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        logits, features = scorer(x)
        score = tf.gather(logits, classes[:, None], batch_dims=1)[:, 0]
    return score, tape.gradient(score, x if wrt == "input" else features), features


def tensors(x, classes):
    """Images and classes as ``class_gradients`` takes them."""
    import tensorflow as tf

    return tf.constant(np.asarray(x, np.float32)), tf.constant(np.asarray(classes, np.int32).reshape(-1))


def scores(model: keras.Model, x, classes) -> np.ndarray:
    """``S_c(x)``: each image's logit of its class, (N,)."""
    logits, _ = ClassScores(model)(np.asarray(x, np.float32))
    return np.take_along_axis(np.asarray(logits), np.asarray(classes).reshape(-1, 1), axis=1)[:, 0]


# --- the methods ------------------------------------------------------------------------------------------------
# Each in two forms: ``<method>_maps`` on tensors, TensorFlow ops only (so that one traced graph can run it: the demo
# page's answers), and ``<method>`` on arrays for a model, which runs it eagerly (predict.py, the training runs).
# The images of SmoothGrad and Integrated Gradients are one batch per image explained (``samples`` noisy copies,
# ``steps + 1`` points of the path): one gradient call each, its size known when traced.


def saliency_maps(scorer: ClassScores, x, classes):
    """``saliency`` on tensors."""
    import tensorflow as tf

    _, gradient, _ = class_gradients(scorer, x, classes)
    return tf.reduce_max(tf.abs(gradient), axis=-1)


def saliency(model: keras.Model, x, classes) -> np.ndarray:
    """Saliency (Simonyan et al. 2014): ``M_ij = max_channels |∂S_c(x)/∂x_ij|``, (N, H, W) >= 0: how much a small
    change of each pixel would move the class's logit."""
    return saliency_maps(ClassScores(model), *tensors(x, classes)).numpy()


def smoothgrad_maps(scorer: ClassScores, x, classes, samples: int = 25, noise: float = 0.15, seed: int = 0):
    """``smoothgrad`` on tensors (the noise is drawn when it runs eagerly, and once when it is traced)."""
    import tensorflow as tf

    rng, maps = np.random.default_rng(seed), []
    for n in range(x.shape[0]):
        image = x[n]
        sigma = noise * (tf.reduce_max(image) - tf.reduce_min(image))
        noisy = image + sigma * rng.standard_normal((samples, *image.shape)).astype(np.float32)
        _, gradient, _ = class_gradients(scorer, noisy, tf.fill([samples], classes[n]))
        maps.append(tf.reduce_max(tf.abs(tf.reduce_mean(gradient, axis=0)), axis=-1))
    return tf.stack(maps)


def smoothgrad(model: keras.Model, x, classes, samples: int = 25, noise: float = 0.15, seed: int = 0) -> np.ndarray:
    """SmoothGrad (Smilkov et al. 2017): ``M = max_channels |(1/n) Σ_i ∇S_c(x + ε_i)|``, ``ε_i ~ N(0, σ²)`` with
    ``σ = noise · (max x − min x)`` per image and ``n = samples``, (N, H, W) >= 0: the saliency of the neighbourhood,
    averaged until the gradient's pixel-to-pixel noise cancels. ``seed`` fixes the ε_i (the same for every model)."""
    return smoothgrad_maps(ClassScores(model), *tensors(x, classes), samples, noise, seed).numpy()


def integrated_gradients_maps(scorer: ClassScores, x, classes, baseline, steps: int = 64):
    """``integrated_gradients`` on tensors."""
    import tensorflow as tf

    alphas = np.linspace(0, 1, steps + 1, dtype=np.float32)[:, None, None, None]
    weights = np.full(steps + 1, 1 / steps, np.float32)
    weights[[0, -1]] /= 2  # trapezoid
    maps = []
    for n in range(x.shape[0]):
        image = x[n]
        start = tf.broadcast_to(np.asarray(baseline, np.float32), image.shape)
        _, gradient, _ = class_gradients(scorer, start + alphas * (image - start), tf.fill([steps + 1], classes[n]))
        maps.append(tf.reduce_sum((image - start) * tf.tensordot(weights, gradient, axes=1), axis=-1))
    return tf.stack(maps)


def integrated_gradients(model: keras.Model, x, classes, baseline, steps: int = 64) -> np.ndarray:
    """Integrated Gradients (Sundararajan et al. 2017), signed, (N, H, W):
    ``M_ij = Σ_channels (x − x')_ij · ∫₀¹ ∂S_c(x' + α(x − x'))/∂x_ij dα``, the integral by the trapezoid rule on
    ``steps`` equal intervals (``steps + 1`` images per input, one batch). ``baseline`` ``x'``: an image, or one
    value per channel (``blank(mean, std)``: the normalised blank image). Completeness: ``Σ_ij M_ij = S_c(x) −
    S_c(x')`` up to the rule's error (tests/test_explain.py: within 1 % at 256 steps)."""
    return integrated_gradients_maps(ClassScores(model), *tensors(x, classes), baseline, steps).numpy()


def gradcam_maps(scorer: ClassScores, x, classes, rows, columns):
    """``gradcam`` on tensors: ``scorer`` made for the layer, ``rows`` and ``columns`` its ``placement``."""
    import tensorflow as tf

    _, gradient, features = class_gradients(scorer, x, classes, wrt="features")
    alpha = tf.reduce_mean(gradient, axis=(1, 2))  # (N, K)
    cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", features, alpha))
    return tf.einsum("ih,nhw,jw->nij", rows, cam, columns)


def gradcam_function(model: keras.Model, layer=None):
    """``gradcam_maps`` for ``model`` and ``layer`` (default: ``feature_layer``), as a function of (x, classes)."""
    layer = layer or feature_layer(model)
    if layer is None:
        raise ValueError(f"gradcam: {model.name} has no conv layer")
    rows, columns = (matrix.astype(np.float32) for matrix in placement(model, layer))
    return functools.partial(gradcam_maps, ClassScores(model, layer), rows=rows, columns=columns)


def gradcam(model: keras.Model, x, classes, layer=None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) on ``layer`` (default: ``feature_layer``, the last conv layer with a
    spatial map), (N, H, W) >= 0: ``L = ReLU(Σ_k α_k A^k)``, ``α_k = (1/Z) Σ_ij ∂S_c/∂A^k_ij`` over the layer's
    ``Z`` positions, each position then put at the centre of its receptive field in the input and interpolated
    bilinearly between centres (a valid conv's map covers the image's middle: stretching it to the image's size
    would move every peak outwards)."""
    return gradcam_function(model, layer)(*tensors(x, classes)).numpy()


# --- Grad-CAM's placement of a layer's map on the input ----------------------------------------------------------


def receptive_field_centres(model: keras.Model, layer) -> list[tuple[float, float, int]]:
    """Per axis (rows, columns): ``(start, jump, size)``: position ``i`` of ``layer``'s output is centred on input
    pixel ``start + i · jump``; composed from the window layers (conv, pooling) up to ``layer``: a window ``k``,
    stride ``s`` and leading pad ``p`` give ``start += ((k − 1) / 2 − p) · jump``, ``jump *= s``."""
    from models.ops import window_output_hw, window_pads

    hw = tuple(model.inputs[0].shape[1:3])
    start, jump = [0.0, 0.0], [1.0, 1.0]
    for current in model.layers:
        window = getattr(current, "kernel_size", None) or getattr(current, "pool_size", None)
        if window is not None:
            strides = tuple(current.strides)
            pads = window_pads(*hw, tuple(window), strides, current.padding)
            for axis in (0, 1):
                start[axis] += ((window[axis] - 1) / 2 - pads[axis][0]) * jump[axis]
                jump[axis] *= strides[axis]
            hw = window_output_hw(hw, tuple(window), strides, pads)
        if current is layer:
            break
    return [(start[axis], jump[axis], hw[axis]) for axis in (0, 1)]


def placement(model: keras.Model, layer) -> tuple[np.ndarray, np.ndarray]:
    """The matrices ``R (H, h)`` and ``C (W, w)`` that put a map ``m (h, w)`` of ``layer`` on the input:
    ``R · m · Cᵀ``, linear interpolation between receptive-field centres, constant beyond the outer ones."""
    out = []
    for (start, jump, size), pixels in zip(receptive_field_centres(model, layer), model.inputs[0].shape[1:3],
                                           strict=True):
        centres = start + jump * np.arange(size)
        out.append(np.stack([np.interp(np.arange(pixels), centres, unit) for unit in np.eye(size)], axis=1)
                   if size > 1 else np.ones((pixels, 1)))
    return out[0], out[1]


# --- one entry point ----------------------------------------------------------------------------------------------


def map_function(model: keras.Model, method: str, baseline=None):
    """``method``'s maps with its default settings as a function of tensors, ``(x (N, H, W, C) float32, classes
    (N,) int32) -> (N, H, W)``, TensorFlow ops only: wrapped in a ``tf.function`` (N known when it is traced),
    one graph runs the whole method. Integrated Gradients needs ``baseline``."""
    if method == "saliency":
        return functools.partial(saliency_maps, ClassScores(model))
    if method == "smoothgrad":
        return functools.partial(smoothgrad_maps, ClassScores(model))
    if method == "ig":
        return functools.partial(integrated_gradients_maps, ClassScores(model), baseline=baseline)
    if method == "gradcam":
        return gradcam_function(model)
    raise ValueError(f"explain: method must be one of {', '.join(METHODS)}, got {method!r}")


def explain(model: keras.Model, x, classes, method: str, baseline=None) -> np.ndarray:
    """``method``'s maps (N, H, W) with its default settings; Integrated Gradients needs ``baseline``."""
    return map_function(model, method, baseline)(*tensors(x, classes)).numpy()


def mistakes_figure(model: keras.Model, images, y_true, y_pred, class_names, baseline, steps: int = 16):
    """Every training run's ``plots/explanations.png``: a few misclassified test images, each explained for the class
    the model said, by Grad-CAM (where) and Integrated Gradients from ``baseline`` (which pixels, for or against).
    Cheap on purpose: Integrated Gradients on ``steps`` intervals, each image's path one batch of fewer than 32
    images (a scratch model runs it without compiling its pieces for a new shape)."""
    from experiments.analysis import plots

    maps, ig = {}, f"{TITLES['ig']} (red: for, blue: against)"
    if feature_layer(model) is not None:
        maps[f"{TITLES['gradcam']} of the predicted class"] = gradcam(model, images, y_pred)
    maps[ig] = integrated_gradients(model, images, y_pred, baseline, steps=steps)
    titles = [f"pred {class_names[p]}\ntrue {class_names[t]}" for p, t in zip(y_pred, y_true, strict=True)]
    return plots.explanations(images, maps, titles, {ig})
