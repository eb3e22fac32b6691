"""The Hydra callback of train.py's sweeps: every ``-m`` gets one parent MLflow run (``experiments.run.sweep``).

Hydra imports every callback of conf/train.yaml at each start, before the first one checks the settings: this
module imports MLflow (seconds) only once a sweep starts, so a bad setting stops train.py in well under a second.
"""

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """The sweep's parent run, new or resumed (``sweep_resume=``), before any job starts."""
        from experiments.run.sweep import start_sweep

        self.sweep = start_sweep(config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from experiments.run.sweep import end_sweep

        end_sweep(self.sweep)
