"""Explanations (experiments/analysis/explain.py): Integrated Gradients' completeness, the same maps from a scratch
model and its builtin twin, the randomisation sanity check, Grad-CAM on the ink, the ``explain`` setting.

One LeNet trained in-process for the module (10,000 MNIST images, 2 epochs, ~93 % on the test images; seconds);
the other models have fixed random weights. Settings that keep a scratch model's batches under 32 images run its
layers without compiling them for new shapes (models/fast.py), which keeps the file fast."""

import time

import keras
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scipy import ndimage
from scipy.stats import spearmanr

from experiments.analysis import explain as E
from experiments.apps.predict import explain_choice
from experiments.config import CHECKS
from experiments.errors import UserError
from experiments.run.data import load_dataset
from models.architectures import ARCHITECTURES, build_model
from tests.conftest import CONF_DIR, compose_train

TWIN = {"rtol": 1e-4}  # the layers' own tolerance (tests/test_layers.py), relative to each map's largest value
# Randomisation (Adebayo et al. 2018): the maps of the trained model and of the same architecture with fresh random
# weights, mean Spearman rank correlation over 10 digits, must stay below (measured: saliency 0.41-0.49, SmoothGrad
# 0.44-0.48, IG −0.06-0.02, Grad-CAM about 0, with three random seeds). The gradient maps keep part of their rank
# order under any weights (the input's ReLU gating, valid convolutions covering border pixels less), hence 0.6.
# IG is checked signed, as it is defined: |IG| keeps ρ ≈ 0.99, because (x − x') is 0 wherever there is no ink,
# the known blind spot of input-multiplied methods in that paper.
RANDOMISED_BELOW = {"saliency": 0.6, "smoothgrad": 0.6, "ig": 0.3, "gradcam": 0.3}
QUICK = {"smoothgrad": {"samples": 16}, "ig": {"steps": 24}}  # < 32 images per batch


def spec(architecture: str, layers: str):
    return OmegaConf.create({"architecture": architecture, "layers": layers, "name": f"{architecture}_{layers}"})


def maps_of(model, x, classes, method, baseline):
    """``method``'s maps with the quick settings."""
    if method == "ig":
        return E.integrated_gradients(model, x, classes, baseline, **QUICK["ig"])
    if method == "smoothgrad":
        return E.smoothgrad(model, x, classes, **QUICK["smoothgrad"])
    return E.saliency(model, x, classes) if method == "saliency" else E.gradcam(model, x, classes)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the Spearman rank correlation of two maps (N, H, W); a constant map (Grad-CAM's ReLU can
    zero it all) has no order to share and counts 0."""
    rhos = [spearmanr(p.ravel(), q.ravel())[0] if np.ptp(p) > 0 and np.ptp(q) > 0 else 0.0
            for p, q in zip(a, b, strict=True)]
    return float(np.mean(rhos))


@pytest.fixture(scope="module")
def mnist():
    cfg = compose_train(["data.train_size=10000", "data.test_size=1000"])
    return load_dataset(cfg.data), E.blank(cfg.data.mean, cfg.data.std)


@pytest.fixture(scope="module")
def trained(mnist):
    """A LeNet trained briefly, its scratch twin with the same weights, and the test digits it classifies most
    confidently, with those classes."""
    data, _ = mnist
    keras.utils.set_random_seed(0)
    model = build_model(spec("lenet", "builtin"), data.input_shape, data.num_classes)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(data.x_train, data.y_train, epochs=2, batch_size=64, verbose=0)
    twin = build_model(spec("lenet", "scratch"), data.input_shape, data.num_classes)
    twin.set_weights(model.get_weights())
    probabilities = model.predict(data.x_test, verbose=0)
    confident = np.argsort(-probabilities.max(axis=1), kind="stable")[:10]
    return model, twin, data.x_test[confident], probabilities[confident].argmax(axis=1)


def test_the_baseline_is_the_normalised_blank_image(mnist):
    data, baseline = mnist
    assert baseline.shape == (1,)
    np.testing.assert_allclose(baseline, data.x_test.min(axis=(0, 1, 2)), rtol=1e-6)  # a 0-intensity pixel
    np.testing.assert_allclose(baseline, [-0.1307 / 0.3081], rtol=1e-3)


def test_integrated_gradients_sum_to_the_score_difference(trained, mnist):
    """Completeness: Σ_ij IG_ij = S_c(x) − S_c(x') within 1 %, at 256 steps (the trapezoid rule's error: measured
    ~0.1 %, and ~0.6 % at 32 steps), for confident digits and for digits of other classes than predicted."""
    model, _, x, classes = trained
    _, baseline = mnist
    x, classes = np.concatenate([x[:4], x[:4]]), np.concatenate([classes[:4], (classes[:4] + 3) % 10])
    attributions = E.integrated_gradients(model, x, classes, baseline, steps=256)
    expected = E.scores(model, x, classes) - E.scores(model, np.broadcast_to(baseline, x.shape), classes)
    error = np.abs(attributions.sum(axis=(1, 2)) - expected) / np.abs(expected)
    print(f"completeness: relative error max {error.max():.2e}, mean {error.mean():.2e}")
    assert attributions.shape == x.shape[:3]
    assert error.max() < 0.01


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_a_scratch_model_and_its_builtin_twin_give_the_same_maps(architecture, mnist):
    """Random weights, copied: the scratch layers' hand-derived backward passes give the builtin layers' maps."""
    data, baseline = mnist
    keras.utils.set_random_seed(1)
    builtin = build_model(spec(architecture, "builtin"), data.input_shape, data.num_classes)
    scratch = build_model(spec(architecture, "scratch"), data.input_shape, data.num_classes)
    scratch.set_weights(builtin.get_weights())
    x, classes = data.x_test[:2], data.y_test[:2]
    for method in E.METHODS:
        b, s = maps_of(builtin, x, classes, method, baseline), maps_of(scratch, x, classes, method, baseline)
        scale = np.abs(b).max()
        print(f"{architecture} {method}: max |scratch - builtin| = {np.abs(s - b).max() / scale:.1e} of the map's max")
        assert scale > 0
        np.testing.assert_allclose(s, b, atol=TWIN["rtol"] * scale, **TWIN, err_msg=method)


def test_the_trained_twins_give_the_same_maps(trained, mnist):
    model, twin, x, classes = trained
    _, baseline = mnist
    for method in E.METHODS:
        b, s = maps_of(model, x[:3], classes[:3], method, baseline), maps_of(twin, x[:3], classes[:3], method, baseline)
        scale = np.abs(b).max()
        print(f"trained lenet {method}: max |scratch - builtin| = {np.abs(s - b).max() / scale:.1e} of the map's max")
        np.testing.assert_allclose(s, b, atol=TWIN["rtol"] * scale, **TWIN, err_msg=method)


def test_maps_change_when_the_weights_are_randomised(trained, mnist):
    """Adebayo et al. 2018's model-randomisation test: a map that explains the model must not survive replacing its
    learnt weights with fresh random ones (all layers). The same measure sees the scratch twin's maps as the same."""
    model, twin, x, classes = trained
    data, baseline = mnist
    keras.utils.set_random_seed(7)
    randomised = build_model(spec("lenet", "builtin"), data.input_shape, data.num_classes)
    for method in E.METHODS:
        learnt = E.explain(model, x, classes, method, baseline)
        rho = rank_correlation(learnt, E.explain(randomised, x, classes, method, baseline))
        print(f"{method}: Spearman rho trained vs randomised {rho:.3f} (must be < {RANDOMISED_BELOW[method]})")
        assert rho < RANDOMISED_BELOW[method], method
    same = rank_correlation(E.saliency(model, x, classes), E.saliency(twin, x, classes))
    assert same > 0.99


def test_gradcam_is_one_map_per_image_peaking_on_the_ink(trained, mnist):
    """The 5 digits classified most confidently: the peak of each Grad-CAM map (the middle of its maximal pixels:
    beyond the outer receptive-field centres the map is flat) is on the ink (intensity > 0.1) or touches it, and the
    map is stronger on the ink than off it. (Measured: 9 of the 10 most confident peaks on the ink, 10 touching it.)"""
    model, _, x, classes = trained
    data, _ = mnist
    x, classes = x[:5], classes[:5]
    cam = E.gradcam(model, x, classes)
    assert cam.shape == (5, 28, 28) and (cam >= 0).all()
    ink = x[..., 0] * 0.3081 + 0.1307 > 0.1
    for image, heat, on in zip(x, cam, ink, strict=True):
        peak = tuple(np.round(np.median(np.argwhere(heat >= heat.max() * (1 - 1e-6)), axis=0)).astype(int))
        assert ndimage.binary_dilation(on)[peak], (peak, image.shape)
        assert heat[on].mean() > heat[~on].mean()


def test_gradcam_puts_each_position_at_its_receptive_fields_centre(trained):
    """LeNet's second conv (5x5 valid, after 5x5 valid and 2x2 pooling): output position i sees input rows
    2i..2i+13, centred on 2i + 6.5; its 8 positions span rows 6.5..20.5 of 28."""
    model, *_ = trained
    layer = E.feature_layer(model)
    assert layer is model.layers[2]
    assert E.receptive_field_centres(model, layer) == [(6.5, 2.0, 8), (6.5, 2.0, 8)]
    rows, columns = E.placement(model, layer)
    assert rows.shape == columns.shape == (28, 8)
    np.testing.assert_allclose(rows.sum(axis=1), 1)  # an interpolation: weights sum to 1
    assert rows[6, 0] == 1 and rows[7].tolist() == [0.75, 0.25, 0, 0, 0, 0, 0, 0]


def test_lenet5_classic_gradcam_uses_the_last_conv_layer_with_a_map():
    keras.utils.set_random_seed(0)
    model = build_model(spec("lenet5_classic", "builtin"), (28, 28, 1), 10)
    assert E.feature_layer(model).output.shape[1:3] == (10, 10)  # C3: C5's output is 1x1


def test_the_training_runs_figure_is_cheap_on_a_scratch_model(trained, mnist):
    """plots/explanations.png of every run: 4 digits, Grad-CAM and Integrated Gradients (16 steps)."""
    _, twin, x, classes = trained
    _, baseline = mnist
    E.mistakes_figure(twin, x[:4], classes[:4], (classes[:4] + 1) % 10, [str(c) for c in range(10)], baseline)
    started = time.process_time()
    fig = E.mistakes_figure(twin, x[:4], classes[:4], (classes[:4] + 1) % 10, [str(c) for c in range(10)], baseline)
    fig.canvas.draw()
    print(f"explanations figure on the scratch LeNet: {time.process_time() - started:.2f} CPU-s")
    assert len(fig.axes) == 3  # the inputs, Grad-CAM, Integrated Gradients


def compose_predict(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="predict", overrides=list(overrides))


@pytest.mark.parametrize("value, method", [([], "off"), (["explain=true"], "maps"), (["explain=false"], "off"),
                                           (["explain=True"], "maps"), (["explain=gradcam"], "gradcam"),
                                           (["explain=ig"], "ig"), (["explain=off"], "off")])
def test_the_explain_setting_keeps_true_and_false(value, method):
    cfg = compose_predict(["images=x", *value])
    CHECKS["predict"](cfg)
    assert explain_choice(cfg.explain) == method


def test_a_bad_method_is_one_line():
    with pytest.raises(UserError) as error:
        CHECKS["predict"](compose_predict(["images=x", "explain=lime"]))
    assert str(error.value) == ("explain must be off, maps, saliency, smoothgrad, ig or gradcam (true: maps, false: "
                                "off), got 'lime'.")
