"""How every command runs (train.py, compare.py, predict.py, demo.py): the same start-up, the same config check,
the same one-line errors and exit codes.

    run("compare")   # an entry point's whole body: conf/compare.yaml, then experiments.apps.compare.main(cfg)

| what happened                                   | printed (stderr)                                  | exit |
|-------------------------------------------------|---------------------------------------------------|------|
| a bad setting or override, a file that is wrong | ``error: <field> must be ..., got <value>.``      | 2    |
| nothing in the store to work on                 | ``error: no finished runs to compare ...``        | 1    |
| a run failed                                    | ``error: <reason>; the run is marked FAILED``     | 1    |

Importing this module is the start-up: Python's garbage collector stays off until the app says its start-up is
done (``experiments.start_up_done``), and the console is quiet — TensorFlow's C++ INFO and WARNING lines, MLflow's
"Downloading artifacts" bars and its run links (each command prints its own). Your own settings of those
variables win.
"""

import gc
import os

gc.disable()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import importlib  # noqa: E402

import hydra  # noqa: E402
from hydra.errors import ConfigCompositionException, OverrideParseException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from experiments import PROJECT_ROOT  # noqa: E402
from experiments.config import composition_error  # noqa: E402  (registers every command's schema)
from experiments.errors import one_line, stop  # noqa: E402


def run(command: str) -> None:
    """Compose conf/<command>.yaml with the command line's overrides (Hydra; its first callback checks every
    setting, ``experiments.config.CheckConfig``), run ``experiments.apps.<command>.main`` on it, and end the
    process with the table's line and exit code for what the user can fix."""
    def task(cfg: DictConfig):
        try:
            return importlib.import_module(f"experiments.apps.{command}").main(cfg)
        except Exception as e:  # in the job: Hydra would log an error of its own around what escapes it
            reported = one_line(e)
            if reported is None:
                raise
            stop(*reported)

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it cannot compose, instead of printing it and exiting 1
    main = hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name=command, version_base="1.3")(task)
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as e:  # a misspelled key, a wrong type, ...
        stop(f"error: {composition_error(e)}", 2)


