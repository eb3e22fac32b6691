"""models.gradcheck: check_layer on right and wrong layers, the command line, and the check every
scratch training run does on its first batch (logged; a failure stops the run FAILED)."""

import re

import keras  # noqa: E402
import mlflow  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from experiments.run.scratch_run import GradcheckFailed  # noqa: E402
from experiments.run.training import train  # noqa: E402
from models import gradcheck, ops  # noqa: E402
from models.layers import ScratchConv2D, ScratchDense  # noqa: E402
from tests.conftest import compose_train  # noqa: E402


class TransposedKernelConv(ScratchConv2D):
    """A student's mistake: the input gradient computed with the kernel's rows and columns swapped."""

    def call(self, inputs):
        kernel, bias = self._weights()
        pads = ops.window_pads(*inputs.shape[1:3], self.kernel_size, self.strides, self.padding)

        @tf.custom_gradient
        def conv(x, kernel, bias):
            y, x_col_t = ops.conv2d_forward(x, kernel, bias, self.strides, pads)

            def grad(dy):
                _, dw, db = ops.conv2d_backward(dy, y, x_col_t, kernel, x.shape, self.strides, pads)
                wrong = tf.transpose(kernel, [1, 0, 2, 3])
                dx, _, _ = ops.conv2d_backward(dy, y, x_col_t, wrong, x.shape, self.strides, pads)
                return dx, dw, db

            return y, grad

        return conv(inputs, kernel, bias)


def rows(table):
    return {row.quantity: row for row in table.rows}


def test_check_layer_passes_a_right_layer():
    table = gradcheck.check_layer(ScratchConv2D(4, 3, activation="relu"), reference=keras.layers.Conv2D(
        4, 3, activation="relu"), input_shape=(2, 9, 9, 3))
    assert table.passed, table
    assert set(rows(table)) == {"output", "input gradient", "kernel gradient", "bias gradient",
                                "input gradient, float64 central differences",
                                "kernel gradient, float64 central differences",
                                "bias gradient, float64 central differences"}
    assert "gradient check passed" in str(table)


def test_check_layer_finds_a_transposed_kernel_in_the_backward_pass():
    table = gradcheck.check_layer(TransposedKernelConv(4, 3), reference=keras.layers.Conv2D(4, 3),
                                  input_shape=(2, 9, 9, 3))
    by_quantity = rows(table)
    assert not table.passed
    assert not by_quantity["input gradient"].passed
    assert not by_quantity["input gradient, float64 central differences"].passed
    assert by_quantity["input gradient"].max_rel_error > 0.1
    for right in ("output", "kernel gradient", "bias gradient", "kernel gradient, float64 central differences"):
        assert by_quantity[right].passed, right
    assert "**FAILED**" in table.markdown() and "gradient check FAILED" in table.markdown()


def test_check_layer_without_reference_uses_central_differences_only():
    table = gradcheck.check_layer(ScratchDense(3, activation="tanh"), input_shape=(4, 5))
    assert table.passed
    assert all("central differences" in row.quantity for row in table.rows)


def wrong_dense_backward(monkeypatch):
    """Every dense layer's input gradient off by 1 %."""
    right = ops.dense_backward

    def off(dy, y, x, kernel, activation=None):
        dx, dw, db = right(dy, y, x, kernel, activation)
        return 1.01 * dx, dw, db

    monkeypatch.setattr(ops, "dense_backward", off)


def test_command_line_exit_status(capsys, monkeypatch):
    assert gradcheck.main(["model=simple_conv_scratch", "batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "simple_conv_scratch: scratch layers against the builtin twin on 8 mnist training images" in out
    assert re.search(r"\| scratch_conv2d\S* \| kernel gradient \| \(3, 3, 1, 8\) \|", out)
    assert "gradient check passed" in out
    wrong_dense_backward(monkeypatch)
    assert gradcheck.main(["model=simple_conv_scratch", "batch_size=8"]) == 1
    assert "gradient check FAILED" in capsys.readouterr().out


TINY_DATA = ["data.train_size=512", "data.val_size=128", "data.test_size=128", "trainer.epochs=1"]
TINY_RUN = ["model=simple_conv_scratch", *TINY_DATA]


def run_of():
    runs = mlflow.search_runs(experiment_names=["lenet-lab"], output_format="list")
    assert len(runs) == 1
    return runs[0]


def test_scratch_run_logs_a_passed_check(store_uri):
    train(compose_train([*TINY_RUN, f"tracking.uri={store_uri}"]))
    run = run_of()
    assert run.data.tags["gradcheck"] == "passed"
    assert 0 <= run.data.metrics["gradcheck_max_rel_error"] < 1e-4
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/gradcheck.md")
    assert re.search(r"\| scratch_dense\S* \| input gradient \|", text) and "passed" in text


def test_failed_check_stops_the_run_before_training(store_uri, monkeypatch):
    wrong_dense_backward(monkeypatch)
    with pytest.raises(GradcheckFailed, match="trainer.gradcheck=warn"):
        train(compose_train([*TINY_RUN, f"tracking.uri={store_uri}"]))
    run = run_of()
    assert run.info.status == "FAILED"
    assert run.data.tags["gradcheck"] == "failed"
    assert run.data.metrics["gradcheck_max_rel_error"] > 1e-3
    assert "loss" not in run.data.metrics  # no epoch was trained


def test_warn_trains_despite_a_failed_check(store_uri, monkeypatch):
    wrong_dense_backward(monkeypatch)
    train(compose_train([*TINY_RUN, "trainer.gradcheck=warn", f"tracking.uri={store_uri}"]))
    run = run_of()
    assert (run.info.status, run.data.tags["gradcheck"]) == ("FINISHED", "failed")


@pytest.mark.parametrize(("model", "gradcheck"), [("simple_conv_scratch", "off"), ("simple_conv", "fail")],
                         ids=["off", "builtin"])
def test_off_and_builtin_runs_skip_the_check(store_uri, model, gradcheck):
    """A scratch model with the check turned off, and the builtin twin with the check on: neither is checked."""
    overrides = [f"model={model}", *TINY_DATA, f"trainer.gradcheck={gradcheck}", f"tracking.uri={store_uri}"]
    train(compose_train(overrides))
    assert "gradcheck" not in run_of().data.tags
