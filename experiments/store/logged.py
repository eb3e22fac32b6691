"""Logged models: log a trained model so that it loads anywhere, find the model a user means, load it.

A model is logged as MLflow's Keras flavor plus, in its ``code/`` folder, a copy of the ``models`` package and of
the modules its pyfunc flavor loads through (``experiments.use.serving``, which registers the scratch layers first
and prepares image files with ``experiments.use.images``). So ``mlflow.pyfunc.load_model`` and ``mlflow models
serve`` work in a process that never saw this project, for tensors and image files alike. The run's data settings
(input shape, normalisation, class names) travel in the MLmodel's metadata, so any model URI, a local folder
included, says how to feed it. The MLmodel has no signature (``experiments.use.serving`` says why).
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
import PIL
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.models import Model, infer_signature
from mlflow.utils import environment as mlflow_environment
from omegaconf import DictConfig, OmegaConf

from experiments import PROJECT_ROOT, errors
from experiments.errors import UserError
from experiments.store.runs import MODEL_ARTIFACT
from experiments.use import images, serving

CODE_DIR = "code"
METADATA_KEY = serving.METADATA_KEY
# The modules of experiments/ a model's pyfunc flavor runs, copied into its code/ folder beside models/.
SERVING_MODULES = (serving, images, errors)
# The __init__.py of each package above them in code/: a docstring, not the lab's own (experiments/__init__.py
# sets up a command's process and needs OmegaConf).
SHIPPED_PACKAGE_INIT = '"""The modules of the LeNet Lab that a logged model\'s pyfunc flavor runs (a copy)."""\n'


# --- Logging ----------------------------------------------------------------------------------------


def copy_model_code(destination: Path) -> None:
    """The ``models`` package's Python files (the scratch layers) into ``destination/models``, and the
    ``SERVING_MODULES`` (the pyfunc entry point and what it imports) at their places in ``destination/experiments``,
    each package there with a one-line ``__init__.py``."""
    package = destination / "models"
    package.mkdir(parents=True)
    for source in (PROJECT_ROOT / "models").glob("*.py"):
        shutil.copy2(source, package / source.name)
    for module in SERVING_MODULES:
        target = destination / Path(module.__file__).relative_to(PROJECT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module.__file__, target)
        folder = target.parent
        while folder != destination:
            (folder / "__init__.py").write_text(SHIPPED_PACKAGE_INIT)
            folder = folder.parent


def save_model(model: keras.Model, path: str, mlflow_model: Model, validate_serving_input: bool, **kwargs) -> None:
    """MLflow flavor hook, called by ``Model.log(flavor=<this module>)``: the Keras flavor, plus the
    code in ``code/`` and the pyfunc flavor pointed at ``experiments.use.serving``. MLflow's Keras flavor
    is given the Keras model's own signature, (N, *input_shape) -> (N, classes), which it expects; the
    MLmodel keeps none, as the pyfunc takes image files too. (``validate_serving_input`` is ``Model.log``'s
    own option, passed on to flavors too.)"""
    Path(path).mkdir(parents=True, exist_ok=True)  # MLflow's Keras flavor writes the input example before creating it
    mlflow.keras.save_model(model, path, mlflow_model=mlflow_model, **kwargs)
    copy_model_code(Path(path) / CODE_DIR)
    pyfunc = mlflow_model.flavors["python_function"]
    pyfunc["loader_module"] = serving.__name__
    pyfunc["code"] = CODE_DIR
    mlflow_model.signature = None
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
    """Log the model to the active run as ``runs:/<id>/model``, with a few real test images as input
    example, the code its pyfunc flavor runs and the data settings."""
    # Explicit requirements: MLflow would otherwise infer them in a subprocess (seconds per run). Pillow reads
    # the image files the served model is sent.
    requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", f"mlflow=={mlflow.__version__}",
                    f"pillow=={PIL.__version__}"]
    with running_versions_unchecked():
        Model.log(
            artifact_path=None,
            name=MODEL_ARTIFACT,
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
    """A model for images takes (batch, height, width, channels) tensors with 1 or 3 channels. The lab's models
    logged without a signature say so in their data settings (``model_data``)."""
    if info.signature is None:
        return
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
