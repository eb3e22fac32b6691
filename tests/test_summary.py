"""models.summary: the shape and parameter formulas against the seed's worked answers and Keras,
the per-layer summary of every model on every dataset, and the command line."""

import subprocess
import sys

import keras
import numpy as np
import pytest

from experiments import PROJECT_ROOT
from models import summary
from models.architectures import build_model
from models.summary import conv_output_size, conv_params, dense_params, same_output_size, summarize
from tests.conftest import compose_train
from tests.test_config import DATASETS, MODELS

# seed 001, cells 5/19 and [Problem 10]: (input h, w, c), filter size, output channels, stride, padding,
# and the seed's output size and parameter count.
SEED_CONVS = [
    pytest.param((144, 144, 3), 3, 6, 1, 0, 142, 168, id="144x144x3-3x3x6"),
    pytest.param((20, 20, 10), 3, 20, 2, 0, 9, 1_820, id="20x20x10-3x3x20-stride2"),
    # The seed prints 31,152 = (3·3·24·48) + 48 = 31,104 + 48, but 3·3·24·48 is 10,368: its arithmetic
    # is off by a factor of 3. The correct count, asserted here, is 10,416.
    pytest.param((60, 60, 24), 3, 48, 1, 0, 58, 10_416, id="60x60x24-3x3x48"),
    # The seed gives only the size here; 8 filters as in its cell 19.
    pytest.param((28, 28, 1), 3, 8, 1, 1, 28, 3 * 3 * 1 * 8 + 8, id="28x28-pad1"),
]


@pytest.mark.parametrize(("hwc", "f", "c_out", "s", "p", "size", "params"), SEED_CONVS)
def test_conv_formulas_give_the_seed_answers_and_agree_with_keras(hwc, f, c_out, s, p, size, params):
    h, w, c_in = hwc
    assert conv_output_size(h, f, s, p) == conv_output_size(w, f, s, p) == size
    assert conv_params(f, f, c_in, c_out, use_bias=True) == params

    # Keras pads only 'valid' (0) or 'same'; with a 3x3 filter at stride 1, 'same' is a padding of 1.
    layer = keras.layers.Conv2D(c_out, f, strides=s, padding="valid" if p == 0 else "same")
    y = layer(np.zeros((1, *hwc), np.float32))
    assert tuple(y.shape) == (1, size, size, c_out)
    assert layer.count_params() == params


@pytest.mark.parametrize(("n", "f", "s"), [(28, 2, 2), (7, 3, 2), (5, 2, 2), (10, 5, 3)])
def test_same_output_size_is_ceil_n_over_s_like_keras(n, f, s):
    expected = -(-n // s)
    assert same_output_size(n, s) == expected
    for layer in (keras.layers.Conv2D(1, f, strides=s, padding="same"),
                  keras.layers.MaxPooling2D(f, strides=s, padding="same")):
        assert tuple(layer(np.zeros((1, n, n, 1), np.float32)).shape[1:3]) == (expected, expected)


def test_dense_params_are_weights_plus_biases():
    assert dense_params(120, 84) == 10_164
    assert dense_params(120, 84, use_bias=False) == 10_080


@pytest.mark.parametrize("data", DATASETS)
@pytest.mark.parametrize("model", MODELS)
def test_summary_agrees_with_keras_for_every_model_on_every_dataset(model, data):
    cfg = compose_train([f"model={model}", f"data={data}"])
    net = build_model(cfg.model, cfg.data.input_shape, len(cfg.data.class_names))
    rows = summarize(net, cfg.data.input_shape)
    assert len(rows) == len(net.layers)
    for row, layer in zip(rows, net.layers, strict=True):
        assert (row.shape, row.params) == (tuple(layer.output.shape[1:]), layer.count_params()), row.name
    assert summary.agrees_with_keras(rows, net)


def run_summary(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "models.summary", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_summary_command_prints_lenets_table():
    result = run_summary("model=lenet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "lenet (builtin layers) on mnist: input 28x28x1, 10 classes"
    assert lines[3].split() == ["conv2d", "Conv2D", "24x24x6", "156", "same"]
    assert lines[-3].split() == ["total", "44,426", "same"]
    assert lines[-1] == "matches Keras: yes"


def test_a_disagreement_with_keras_is_shown_and_fails(monkeypatch, capsys):
    monkeypatch.setitem(summary.RULES, "Dense", lambda config, shape: ((config["units"],), 0))  # no weights
    assert summary.main(["model=simple_conv"]) == 1
    lines = capsys.readouterr().out.splitlines()
    dense_row = next(line.split() for line in lines if line.split()[1:2] == ["Dense"])
    assert dense_row[2:] == ["10", "0", "10,", "13,530"]  # computed shape and count, then Keras's
    assert lines[-3].split() == ["total", "80", "13,610"]
    assert lines[-1] == "matches Keras: no"


def test_a_bad_override_is_reported_by_hydra_with_the_usage(capsys):
    assert summary.main(["model=resnet152"]) == 2
    err = capsys.readouterr().err
    assert "Could not find 'model/resnet152'" in err and "usage: python -m models.summary" in err


def test_help_lists_the_model_and_data_options(capsys):
    assert summary.main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = dict(line.strip().split(": ", 1) for line in out.splitlines()[1:])
    assert listed == {"model": ", ".join(MODELS), "data": ", ".join(DATASETS)}
