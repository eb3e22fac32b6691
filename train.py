"""Train a LeNet-family CNN and log the run to MLflow.

    python train.py                                   # LeNet on the bundled MNIST
    python train.py model=lenet_scratch trainer.epochs=3
    python train.py -m model=lenet,simple_conv seed=0,1,2
    python train.py resume=<run id>                   # continue an interrupted run
    python train.py --help                            # config groups and options
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import experiments  # noqa: E402, F401  (registers the ${project_root:} resolver)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from experiments.launch import launch

    hydra_cfg = HydraConfig.get()
    sweep_dir = hydra_cfg.sweep.dir if hydra_cfg.mode == RunMode.MULTIRUN else None
    return launch(cfg, list(hydra_cfg.overrides.task), sweep_dir)


if __name__ == "__main__":
    main()
