"""Per-layer summary of a configured model: output shapes and parameter counts computed from the
layers' configs with the textbook formulas, independently of Keras, then checked against Keras.

    python -m models.summary                               # LeNet on MNIST
    python -m models.summary model=vgg_tiny data=cifar10   # any train.py config override

Exits 1 if a computed shape or count differs from Keras's, 2 on a bad override.
"""

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from models.architectures import build_model, layer_kit  # noqa: E402

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # train.py's configs

# --------------------------------------------------------------------------- formulas


def conv_output_size(n, f, s=1, p=0):
    """Output length of an ``f``-wide window sliding with stride ``s`` over ``n`` inputs zero-padded
    by ``p`` on each side: ``floor((n + 2p - f) / s) + 1``."""
    return (n + 2 * p - f) // s + 1


def same_output_size(n, s):
    """Output length with TensorFlow's 'same' padding, whatever the window: ``ceil(n / s)``."""
    return math.ceil(n / s)


def window_output_size(n, f, s, padding):
    """Output length of a conv or pooling window for a Keras ``padding``: 'valid' is ``p = 0``."""
    return same_output_size(n, s) if padding == "same" else conv_output_size(n, f, s)


def conv_params(kh, kw, c_in, c_out, use_bias=True):
    """Parameters of a conv layer: ``kh·kw·c_in·c_out`` weights + ``c_out`` biases."""
    return kh * kw * c_in * c_out + (c_out if use_bias else 0)


def dense_params(n_in, n_out, use_bias=True):
    """Parameters of a dense layer: ``n_in·n_out`` weights + ``n_out`` biases."""
    return n_in * n_out + (n_out if use_bias else 0)


# --------------------------------------------------------------------------- one rule per layer type
# Each takes the layer's get_config() and its input shape (without the batch axis) and returns
# (output shape, parameter count).


def window_hw(config, shape, window_key):
    """Output height and width of a conv or pooling layer."""
    return tuple(
        window_output_size(n, f, s, config["padding"])
        for n, f, s in zip(shape[:2], config[window_key], config["strides"], strict=True)
    )


def conv_layer(config, shape):
    kh, kw = config["kernel_size"]
    out_shape = (*window_hw(config, shape, "kernel_size"), config["filters"])
    return out_shape, conv_params(kh, kw, shape[2], config["filters"], config["use_bias"])


def pool_layer(config, shape):
    return (*window_hw(config, shape, "pool_size"), shape[2]), 0


def flatten_layer(config, shape):
    return (math.prod(shape),), 0


def dense_layer(config, shape):
    return (config["units"],), dense_params(shape[-1], config["units"], config["use_bias"])


def batch_norm_layer(config, shape):
    """Per channel: ``gamma`` (``scale``), ``beta`` (``center``), the moving mean and the moving variance."""
    return shape, (config["scale"] + config["center"] + 2) * shape[-1]


def same_shape_layer(config, shape):
    return shape, 0


def global_pool_layer(config, shape):
    return ((1, 1, shape[-1]) if config["keepdims"] else (shape[-1],)), 0


RULES = {
    "Conv2D": conv_layer,
    "MaxPool2D": pool_layer,
    "AvgPool2D": pool_layer,
    "Flatten": flatten_layer,
    "Dense": dense_layer,
    "BatchNorm": batch_norm_layer,
    "Dropout": same_shape_layer,
    "GlobalAvgPool2D": global_pool_layer,
    "Activation": same_shape_layer,
}


def layer_rules():
    """Layer class -> its rule, for the classes of the builtin and of the scratch layer kit."""
    return {cls: RULES[kind] for kit in ("builtin", "scratch") for kind, cls in vars(layer_kit(kit)).items()}


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    shape: tuple  # computed
    params: int  # computed
    keras_shape: tuple
    keras_params: int

    @property
    def agrees(self) -> bool:
        return self.shape == self.keras_shape and self.params == self.keras_params


def summarize(model, input_shape) -> list[LayerRow]:
    """One row per layer: the computed output shape and parameters, each layer's from the previous
    one's computed shape, next to Keras's. Keras's shape is that of a real forward pass of one blank
    image, so a layer's own compute_output_shape is not taken on trust."""
    rules = layer_rules()
    shape = tuple(input_shape)
    x = np.zeros((1, *shape), np.float32)
    rows = []
    for layer in model.layers:
        x = layer(x)
        out_shape, params = rules[type(layer)](layer.get_config(), shape)
        rows.append(LayerRow(layer.name, type(layer).__name__, out_shape, params,
                             tuple(x.shape[1:]), layer.count_params()))
        shape = out_shape
    return rows


def format_shape(shape) -> str:
    return "x".join(map(str, shape))


def keras_column(row: LayerRow) -> str:
    """'same' when Keras agrees, else Keras's own shape and count."""
    return "same" if row.agrees else f"{format_shape(row.keras_shape)}, {row.keras_params:,}"


def format_table(rows, keras_total) -> str:
    """The layers as aligned columns, then the total."""
    total_params = sum(r.params for r in rows)
    table = [("layer", "type", "output shape", "params", "Keras")]
    table += [(r.name, r.type, format_shape(r.shape), f"{r.params:,}", keras_column(r)) for r in rows]
    total_keras = "same" if total_params == keras_total else f"{keras_total:,}"
    table.append(("total", "", "", f"{total_params:,}", total_keras))
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    lines = [
        f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {shape:<{widths[2]}}  {params:>{widths[3]}}  {keras}"
        for name, kind, shape, params, keras in table
    ]
    return "\n".join(lines)


def agrees_with_keras(rows, model) -> bool:
    return all(r.agrees for r in rows) and sum(r.params for r in rows) == model.count_params()


def summary_text(cfg, rows, keras_total, agrees) -> str:
    header = (f"{cfg.model.name} ({cfg.model.layers} layers) on {cfg.data.name}: "
              f"input {format_shape(cfg.data.input_shape)}, {len(cfg.data.class_names)} classes")
    table = format_table(rows, keras_total)
    return f"{header}\n\n{table}\n\nmatches Keras: {'yes' if agrees else 'no'}"


# --------------------------------------------------------------------------- command line


def options(group) -> str:
    return ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def usage() -> str:
    return (
        "usage: python -m models.summary [GROUP=OPTION] [key=value ...]   (train.py's config overrides)\n"
        f"  model: {options('model')}\n"
        f"  data: {options('data')}"
    )


def configured_model(overrides):
    """The composed train config and the model it describes."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return cfg, build_model(cfg.model, cfg.data.input_shape, len(cfg.data.class_names))


def main(argv) -> int:
    if {"-h", "--help"} & set(argv):
        print(usage())
        return 0
    try:
        cfg, model = configured_model(argv)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"error: {e}\n\n{usage()}", file=sys.stderr)
        return 2
    rows = summarize(model, cfg.data.input_shape)
    agrees = agrees_with_keras(rows, model)
    print(summary_text(cfg, rows, model.count_params(), agrees))
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
