"""Train a LeNet-family CNN and log the run to MLflow.

    python train.py                                   # LeNet on the bundled MNIST
    python train.py model=lenet_scratch trainer.epochs=3
    python train.py -m model=lenet,simple_conv seed=0,1,2
    python train.py resume=<run id>                   # continue an interrupted run
    python train.py --help                            # config groups and options
"""

import gc
import os
import sys

# Python's garbage collector stays off while the run starts; training (or a sweep's start) turns it back on
# without the start-up's objects: experiments.start_up_done.
gc.disable()

# A quiet console, set before TensorFlow and MLflow are imported (your own settings win). What TensorFlow prints
# before it reads its level is filtered where it is first imported (experiments/__init__.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO and WARNING lines; errors show
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts" bars (resume)
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the run's page is our last line

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import ConfigCompositionException, OverrideParseException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments.config import composition_error  # noqa: E402  (also registers the config schemas, the ${project_root:} resolver)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from experiments.apps.train import launch

    hydra_cfg = HydraConfig.get()
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    return launch(cfg, list(hydra_cfg.overrides.task), sweep_dir)


if __name__ == "__main__":
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it cannot compose, instead of printing it and exiting 1
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as e:  # a misspelled key, a wrong type, ...
        print(f"error: {composition_error(e)}", file=sys.stderr)
        sys.exit(2)
