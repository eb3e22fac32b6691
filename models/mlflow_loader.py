"""MLflow's pyfunc entry point for the models this project logs.

A logged model carries a copy of this package in its ``code/`` folder, and its MLmodel names this
module as the pyfunc ``loader_module``. MLflow puts ``code/`` on ``sys.path`` and calls
``_load_pyfunc`` from here, so the scratch layers are registered with Keras before the model file
is read: ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` work in any process, with or
without this project installed.
"""

import mlflow.keras
from mlflow.keras.load import KerasModelWrapper

import models.layers  # noqa: F401  (registers ScratchConv2D & co. with Keras on import)


class DirectCallModel(KerasModelWrapper):
    """MLflow's Keras wrapper, calling the model directly: no progress bar in the server's log and
    no per-request input pipeline (``Model.predict`` builds one)."""

    def get_model_call_method(self):
        return lambda inputs: self.model(inputs, training=False)


def _load_pyfunc(path: str) -> DirectCallModel:
    """The loader_module contract: a pyfunc implementation from the model's local folder."""
    wrapper = mlflow.keras._load_pyfunc(path)
    return DirectCallModel(wrapper.model, wrapper.signature, wrapper.save_exported_model)
