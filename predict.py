"""Predict the class of your own images (photos or scans of digits) with a model from the store.

    python predict.py images=my_digit.jpg                    # the champion / best lenet run
    python predict.py images=scans/ recursive=true explain=true
    python predict.py images=digit.png run_id=<id>           # or model_uri=models:/lenet-lab-lenet@champion
"""

import gc
import os
import sys

# Python's garbage collector stays off while TensorFlow, MLflow and the model load: experiments.start_up_done.
gc.disable()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments.errors import UserError  # noqa: E402  (also registers the ${project_root:} resolver)


@hydra.main(config_path="conf", config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from experiments.apps.predict import predict

    try:
        code = predict(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
