"""Logged models: log a trained model so that it loads anywhere, find the model a user means, load it.

A model is logged as MLflow's Keras flavor plus a copy of the ``models`` package in its ``code/``
folder; its pyfunc flavor loads through ``models.mlflow_loader``, which registers the scratch
layers first. So ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` work in a process that
never saw this project. The run's data settings (input shape, normalisation, class names) travel
in the MLmodel's metadata, so any model URI, a local folder included, says how to feed it.
"""

import contextlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import keras
import mlflow
import numpy as np
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.utils import environment as mlflow_environment
from omegaconf import DictConfig, OmegaConf

from experiments import PROJECT_ROOT
from experiments.errors import UserError

ARTIFACT_NAME = "model"  # runs:/<run id>/model
CODE_DIR = "code"
LOADER_MODULE = "models.mlflow_loader"
METADATA_KEY = "lenet_lab"


# --- Logging ----------------------------------------------------------------------------------------


def copy_layer_code(destination: Path) -> None:
    """The ``models`` package's Python files (the scratch layers and the pyfunc loader) into
    ``destination/models``."""
    package = destination / "models"
    package.mkdir(parents=True)
    for source in (PROJECT_ROOT / "models").glob("*.py"):
        shutil.copy2(source, package / source.name)


def save_model(model: keras.Model, path: str, mlflow_model: Model, validate_serving_input: bool, **kwargs) -> None:
    """MLflow flavor hook, called by ``Model.log(flavor=<this module>)``: the Keras flavor, plus the
    layer code in ``code/`` and the pyfunc flavor pointed at our loader. (``validate_serving_input``
    is ``Model.log``'s own option, passed on to flavors too.)"""
    Path(path).mkdir(parents=True, exist_ok=True)  # MLflow's Keras flavor writes the input example before creating it
    mlflow.keras.save_model(model, path, mlflow_model=mlflow_model, **kwargs)
    copy_layer_code(Path(path) / CODE_DIR)
    pyfunc = mlflow_model.flavors["python_function"]
    pyfunc["loader_module"] = LOADER_MODULE
    pyfunc["code"] = CODE_DIR
    mlflow_model.save(str(Path(path) / "MLmodel"))


def data_metadata(cfg: DictConfig) -> dict:
    """What a user of the model needs to know about its training data and architecture."""
    return {
        "model": cfg.model.name,
        "architecture": cfg.model.architecture,
        "layers": cfg.model.layers,
        "dataset": cfg.data.name,
        "input_shape": list(cfg.data.input_shape),
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "class_names": [str(name) for name in cfg.data.class_names],
    }


def running_versions_unchecked():
    """While a model is logged with the running versions as its requirements: MLflow's check of them against
    the installed packages, which cannot fail then and maps every installed distribution's files to find
    three versions, is skipped. Where MLflow has no such check, nothing changes."""
    if not hasattr(mlflow_environment, "warn_dependency_requirement_mismatches"):
        return contextlib.nullcontext()
    return mock.patch.object(mlflow_environment, "warn_dependency_requirement_mismatches", lambda requirements: None)


def log_model(model: keras.Model, cfg: DictConfig, examples: np.ndarray, probabilities: np.ndarray) -> None:
    """Log the model to the active run as ``runs:/<id>/model``, with its signature, a few real test
    images as input example, the layer code and the data settings."""
    # Explicit requirements: MLflow would otherwise infer them in a subprocess (seconds per run).
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", f"mlflow=={mlflow.__version__}"]
    with running_versions_unchecked():
        Model.log(
            artifact_path=None,
            name=ARTIFACT_NAME,
            flavor=sys.modules[__name__],
            flavor_name="keras",
            model=model,
            signature=infer_signature(examples, probabilities),
            input_example=examples,
            pip_requirements=requirements,
            # Loading the model back to validate the example costs a second per run; the serving tests
            # check the logged model end to end instead.
            validate_serving_input=False,
            metadata={METADATA_KEY: data_metadata(cfg)},
        )


# --- Where a run's model is ---------------------------------------------------------------------


def runs_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{ARTIFACT_NAME}"


# --- Loading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedModel:
    """A Keras model and what its training data looked like (``data_metadata``)."""

    model: keras.Model
    data: DictConfig
    run_id: str | None


def model_data(info, uri: str) -> DictConfig:
    """The data settings of a logged model: its metadata, or for models logged before it was
    recorded there, the data section of its run's config.yaml."""
    metadata = (info.metadata or {}).get(METADATA_KEY)
    if metadata:
        return OmegaConf.create(metadata)
    if info.run_id:
        try:
            config = OmegaConf.create(mlflow.artifacts.load_text(f"runs:/{info.run_id}/config.yaml"))
        except (MlflowException, OSError):
            config = None
        if config is not None and "data" in config and "model" in config:
            return OmegaConf.merge(config.data, {"model": config.model.name, "architecture": config.model.architecture,
                                                 "layers": config.model.layers, "dataset": config.data.name})
    raise UserError(f"model {uri}: no LeNet Lab data settings (input shape, normalisation) recorded with it.")


def check_image_input(info, uri: str) -> None:
    """A model for images takes (batch, height, width, channels) tensors with 1 or 3 channels."""
    inputs = info.signature.inputs.to_dict() if info.signature and info.signature.inputs else []
    shape = inputs[0].get("tensor-spec", {}).get("shape") if len(inputs) == 1 else None
    if not shape or len(shape) != 4 or shape[-1] not in (1, 3):
        raise UserError(f"model {uri}: its input is not an image (signature inputs: {inputs or 'none'}).")


def load_model(uri: str) -> LoadedModel:
    """Load a logged model of this project (any MLflow model URI or a local folder) as Keras, with
    the data settings it was trained with. Failures are one-line ``UserError``s naming the URI."""
    import models.layers  # noqa: F401  (registers the scratch layers before the model file is read)

    try:
        info = mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as e:
        message = getattr(e, "message", str(e)).splitlines()[0]
        raise UserError(f"model {uri}: cannot be found ({message}).") from None
    check_image_input(info, uri)
    data = model_data(info, uri)
    try:
        model = mlflow.keras.load_model(uri)
    except (MlflowException, OSError, ValueError, TypeError) as e:
        raise UserError(f"model {uri}: cannot be loaded as a Keras model ({type(e).__name__}: {e}).") from None
    return LoadedModel(model, data, info.run_id)
