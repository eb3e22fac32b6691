"""Draw a digit, watch the network think: a local web page for the models in the store.

    python demo.py                 # http://127.0.0.1:<free port>, the address printed
    python demo.py port=7860
"""

import gc
import os
import sys

# Python's garbage collector stays off while TensorFlow, MLflow and the model load: experiments.start_up_done.
gc.disable()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts" per model

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments.errors import UserError  # noqa: E402  (also registers the ${project_root:} resolver)


@hydra.main(config_path="conf", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from experiments.apps.demo import serve

    try:
        serve(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
