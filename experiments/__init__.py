"""Data, training and tracking code behind ``train.py``."""

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """A problem the user can fix (bad setting, missing data); reported in one line, no traceback."""


# Hydra output directories and data paths are anchored here, never at the current directory.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
