"""Train a LeNet-family CNN and log the run to MLflow.

    python train.py                                   # LeNet on the bundled MNIST
    python train.py model=lenet_scratch trainer.epochs=3
    python train.py -m model=lenet,simple_conv seed=0,1,2
    python train.py --help                            # config groups and options
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments import UserError  # noqa: E402  (also registers the ${project_root:} resolver)


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from experiments.sweep import end_sweep_early, read_sweep
    from experiments.training import train

    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # a killed job is marked KILLED too
    hydra_cfg = HydraConfig.get()
    sweep = read_sweep(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        result = train(cfg, overrides=hydra_cfg.overrides.task, sweep=sweep)
    except BaseException as e:
        if sweep:
            end_sweep_early(sweep, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
    print(f"MLflow run id: {result.run_id}")
    print(f"test_loss={result.test_loss:.4f} test_accuracy={result.test_accuracy:.4f}")
    return result.test_accuracy


if __name__ == "__main__":
    main()
