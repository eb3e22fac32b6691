"""The pyfunc entry point of the models this project logged before they took image files.

Their MLmodel names this module as the pyfunc ``loader_module`` and their ``code/`` folder carries a copy of it;
models logged now load through ``experiments.use.serving`` instead. MLflow puts ``code/`` on ``sys.path``, but in
a process that has already imported this project's ``models`` package, ``models.mlflow_loader`` is looked up
here: this module keeps those models loading there (``mlflow.pyfunc.load_model`` in a session that uses the
lab), tensors only, as they were logged.
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
