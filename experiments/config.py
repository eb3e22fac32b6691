"""The settings of every command (train.py, tune.py, compare.py, predict.py, demo.py): a typed schema for every config
group, and the checks types cannot express.

Every bad setting is reported in one line that names the field and the value, before any data is
loaded or any MLflow call is made, e.g. ``seed must be an integer in [0, 4294967295], got 'abc'.``

1. Schemas. The dataclasses below are registered in Hydra's ConfigStore as ``schema/<name>``, and
   each yaml of a group names its schema first in its defaults list (``optional /schema@_here_:
   trainer``), so OmegaConf itself refuses, while Hydra composes the config, a value of the wrong
   type, a null where a value is required and a key that is no setting (``trainer.epoch=3``).
   ``composition_error`` turns Hydra's report of such an override into the one line (train.py).
   ``optional``: a process that never imports this module composes the yaml untyped (``experiments.cli``
   imports it before Hydra composes).
2. Checks (``check``): ranges, choices, NaN / inf, empty names, list lengths, tracking URIs, and the
   settings that ``+key=`` / ``~key`` / ``key=???`` add or remove; one small function per group, the
   value rules in ``RULES``, one checker per command in ``CHECKS``. ``CheckConfig``, the first callback
   of every command's yaml, runs them before anything else (for train.py: before the sweep's parent run is
   created or a resumed run looked up); the apps run them too (in-process callers, a resumed run's logged
   config).

The checks that need the images (``data.val_size`` and the caps against the dataset's size) stay in
``experiments.run.data.load_dataset``, which ``train`` calls before it creates the MLflow run.

A new setting in a yaml file needs its field here (and its rule in ``RULES``), or Hydra refuses it.
"""

import copy
import difflib
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from experiments.errors import UserError

# --- Schemas: the type of every setting (the values are in the yaml files) --------------------------


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = MISSING
    path: str | None = MISSING
    sha256: str | None = MISSING
    input_shape: list[int] = MISSING
    class_names: list[str] = MISSING
    val_size: int = MISSING
    train_size: int | None = MISSING
    test_size: int | None = MISSING
    max_shift: int = MISSING
    max_rotation: float = MISSING
    max_scale: float = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    architecture: str = MISSING
    layers: str = MISSING


@dataclass
class OptimizerConfig:
    name: str = MISSING
    learning_rate: float = MISSING
    schedule: str = MISSING
    warmup_epochs: float = MISSING
    weight_decay: float = MISSING


@dataclass
class SGDConfig(OptimizerConfig):
    momentum: float = MISSING


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    steps_per_execution: int = MISSING
    xla: bool = MISSING
    gradcheck: str = MISSING
    strategy: str = MISSING
    keep: str = MISSING
    plots: bool = MISSING


@dataclass
class TrackingConfig:
    uri: str | None = MISSING
    experiment: str = MISSING
    local_dir: str | None = MISSING


@dataclass
class CompareConfig:
    tracking: TrackingConfig = MISSING
    sweep_id: str | None = MISSING
    filter: str | None = MISSING
    output_dir: str | None = MISSING
    register: bool = MISSING
    stale_after_minutes: Any = MISSING  # a number: an int stays one, as the user wrote it


@dataclass
class PredictConfig:
    tracking: TrackingConfig = MISSING
    images: str | None = MISSING
    recursive: bool = MISSING
    model_uri: str | None = MISSING
    run_id: str | None = MISSING
    model: ModelConfig = MISSING
    explain: str = MISSING  # off, maps or a method of experiments/analysis/explain.py; true = maps, false = off
    batch_size: int = MISSING
    output_dir: str | None = MISSING


@dataclass
class DemoConfig:
    tracking: TrackingConfig = MISSING
    port: int | None = MISSING
    method: str = MISSING  # the page's first explanation method, of experiments/analysis/explain.py


@dataclass
class HparamsConfig:
    """train.py hparams=tuned (conf/hparams/tuned.yaml): where the tuned setting comes from."""

    study: str = MISSING
    storage: str | None = MISSING
    trial: int | None = MISSING


@dataclass
class RunConfig:
    """What a training run is made of: the groups train.py and tune.py share."""

    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    optimizer: OptimizerConfig = MISSING  # or an SGDConfig
    trainer: TrainerConfig = MISSING
    tracking: TrackingConfig = MISSING
    seed: int = MISSING


@dataclass
class TrainConfig(RunConfig):
    resume: str | None = MISSING
    sweep_resume: str | None = MISSING
    hparams: HparamsConfig | None = None  # null: the config's own values


@dataclass
class FloatRange:
    low: float = MISSING
    high: float = MISSING
    log: bool = MISSING


@dataclass
class IntRange:
    low: int = MISSING
    high: int = MISSING


@dataclass
class SpaceConfig:
    """tune.py's search space (conf/tune/space/): one range or list of choices per tuned setting."""

    learning_rate: FloatRange = MISSING  # optimizer.learning_rate
    weight_decay: FloatRange = MISSING  # optimizer.weight_decay
    batch_size: list[int] = MISSING  # trainer.batch_size
    schedule: list[str] = MISSING  # optimizer.schedule
    max_shift: IntRange = MISSING  # data.max_shift


@dataclass
class TuneSettings:
    study: str = MISSING
    trials: int = MISSING
    epochs: int = MISSING
    pruner: str = MISSING
    startup_trials: int = MISSING
    storage: str | None = MISSING
    space: SpaceConfig = MISSING


@dataclass
class TuneConfig(RunConfig):
    tune: TuneSettings = MISSING


SCHEMAS = {"train": TrainConfig, "tune": TuneConfig, "compare": CompareConfig, "predict": PredictConfig,
           "demo": DemoConfig, "data": DataConfig, "model": ModelConfig, "optimizer": OptimizerConfig,
           "sgd": SGDConfig, "trainer": TrainerConfig, "tracking": TrackingConfig, "tune_space": SpaceConfig,
           "hparams": HparamsConfig}


def register_schemas() -> None:
    """``schema/<name>`` in Hydra's ConfigStore, for the yaml files' defaults lists (on import)."""
    for name, node in SCHEMAS.items():
        ConfigStore.instance().store(group="schema", name=name, node=node)


register_schemas()

# --- Rules: what each value must be ------------------------------------------------------------------

MAX_SEED = 2**32 - 1
METHODS = ("saliency", "smoothgrad", "ig", "gradcam")  # experiments/analysis/explain.py's explanation methods
CHOICES = {"optimizer.name": ("adam", "sgd"), "optimizer.schedule": ("constant", "cosine"),
           "model.layers": ("builtin", "scratch"), "data.source": ("npz", "keras"),
           "trainer.gradcheck": ("fail", "warn", "off"), "trainer.strategy": ("auto", "mirrored", "multi_worker"),
           "trainer.keep": ("last", "best"),
           "tune.pruner": ("median", "hyperband", "none"),
           "explain": ("off", "maps", *METHODS), "method": METHODS}
KERAS_DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist")  # the image sets of keras.datasets
NPZ_NEEDS = {"path": "a file (relative to the project root)", "sha256": "the file's SHA-256 (64 hex digits)"}
STORE_SCHEMES = ("http", "https", "postgresql")  # and sqlite:///<path>; MLflow 3.17 refuses file stores
STUDY_SCHEMES = ("postgresql",)  # and sqlite:///<path>: where an Optuna study lives (experiments/store/studies.py)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int in Python


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, not inf or nan)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_name(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def is_list(value: Any, item: Callable[[Any], bool]) -> bool:
    return isinstance(value, ListConfig | list) and all(item(x) for x in value)


def is_store_uri(value: Any) -> bool:
    """null, sqlite:///<path>, or http(s) / postgresql(+driver) with a host."""
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    if value.startswith("sqlite:"):
        return value.startswith("sqlite:///") and len(value) > len("sqlite:///")
    parts = urlsplit(value)
    return parts.scheme.split("+")[0] in STORE_SCHEMES and parts.netloc != ""


def is_study_storage(value: Any) -> bool:
    """null, sqlite:///<path>, or postgresql(+driver)://<host>/<database>: an Optuna RDB storage."""
    if value is None or isinstance(value, str) and value.startswith("sqlite:"):
        return is_store_uri(value)
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme.split("+")[0] in STUDY_SCHEMES and parts.netloc != ""


class Rule(NamedTuple):
    expect: str  # "... must be <expect>, got <value>."
    ok: Callable[[Any], bool]


def choice(key: str) -> Rule:
    options = CHOICES[key]
    return Rule(f"{', '.join(options[:-1])} or {options[-1]}", lambda v: v in options)


AT_LEAST_ONE = Rule("an integer >= 1", lambda v: is_int(v) and v >= 1)
AT_LEAST_ONE_OR_NULL = Rule("an integer >= 1 or null (all)", lambda v: v is None or is_int(v) and v >= 1)
NAME = Rule("a non-empty name", is_name)
NAME_OR_NULL = Rule("a non-empty string or null", lambda v: v is None or is_name(v))
BOOL = Rule("true or false", lambda v: isinstance(v, bool))
POSITIVE_NUMBER = Rule("a number > 0 (not inf or nan)", lambda v: is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Rule("a number >= 0", lambda v: is_number(v) and v >= 0)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
STUDY_STORAGE = Rule("null (beside the tracking store), sqlite:///<path> or postgresql://<host>/<database>",
                     is_study_storage)

RULES: dict[str, Rule] = {
    "seed": Rule(f"an integer in [0, {MAX_SEED}]", lambda v: is_int(v) and 0 <= v <= MAX_SEED),
    "resume": NAME_OR_NULL,
    "sweep_resume": NAME_OR_NULL,
    "tracking.uri": Rule("null, sqlite:///<path>, http(s)://<host> or postgresql://<host>/<database>",
                         is_store_uri),
    "tracking.experiment": NAME,
    "tracking.local_dir": NAME_OR_NULL,
    "trainer.epochs": AT_LEAST_ONE,
    "trainer.batch_size": AT_LEAST_ONE,
    "trainer.steps_per_execution": AT_LEAST_ONE,
    "trainer.xla": BOOL,
    "trainer.gradcheck": choice("trainer.gradcheck"),
    "trainer.strategy": choice("trainer.strategy"),
    "trainer.keep": choice("trainer.keep"),
    "trainer.plots": BOOL,
    "optimizer.name": choice("optimizer.name"),
    "optimizer.learning_rate": POSITIVE_NUMBER,
    "optimizer.schedule": choice("optimizer.schedule"),
    "optimizer.warmup_epochs": NON_NEGATIVE_NUMBER,
    "optimizer.weight_decay": NON_NEGATIVE_NUMBER,
    "optimizer.momentum": Rule("a number in [0, 1]", lambda v: is_number(v) and 0 <= v <= 1),
    "model.name": NAME,
    "model.architecture": Rule("the name of a builder in models/architectures.py", is_name),
    "model.layers": choice("model.layers"),
    "data.name": NAME,
    "data.source": choice("data.source"),
    "data.path": NAME_OR_NULL,
    "data.sha256": Rule("64 hex digits (the file's SHA-256) or null",
                        lambda v: v is None or isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None),
    "data.input_shape": Rule("[height, width, channels]: 3 integers >= 1",
                             lambda v: is_list(v, lambda n: is_int(n) and n >= 1) and len(v) == 3),
    "data.class_names": Rule("a list of 2 or more distinct names",
                             lambda v: is_list(v, is_name) and len(v) >= 2 and len(set(v)) == len(v)),
    "data.val_size": AT_LEAST_ONE,
    "data.train_size": AT_LEAST_ONE_OR_NULL,
    "data.test_size": AT_LEAST_ONE_OR_NULL,
    "data.max_shift": NON_NEGATIVE_INT,
    "data.max_rotation": Rule("a number of degrees in [0, 180)", lambda v: is_number(v) and 0 <= v < 180),
    "data.max_scale": Rule("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1),
    "data.mean": Rule("a list of numbers (not inf or nan), one per image channel", lambda v: is_list(v, is_number)),
    "data.std": Rule("a list of numbers > 0 (not inf or nan), one per image channel",
                     lambda v: is_list(v, lambda s: is_number(s) and s > 0)),
    # train.py hparams=tuned
    "hparams.study": NAME,
    "hparams.storage": STUDY_STORAGE,
    "hparams.trial": Rule("an integer >= 0 (a trial's number) or null (the best trial)",
                          lambda v: v is None or is_int(v) and v >= 0),
    # tune.py
    "tune.study": NAME,
    "tune.trials": AT_LEAST_ONE,
    "tune.epochs": AT_LEAST_ONE,
    "tune.pruner": choice("tune.pruner"),
    "tune.startup_trials": NON_NEGATIVE_INT,
    "tune.storage": STUDY_STORAGE,
    "tune.space.learning_rate.low": POSITIVE_NUMBER,
    "tune.space.learning_rate.high": POSITIVE_NUMBER,
    "tune.space.learning_rate.log": BOOL,
    "tune.space.weight_decay.low": NON_NEGATIVE_NUMBER,
    "tune.space.weight_decay.high": NON_NEGATIVE_NUMBER,
    "tune.space.weight_decay.log": BOOL,
    "tune.space.batch_size": Rule("a list of 1 or more distinct integers >= 1",
                                  lambda v: is_list(v, lambda n: is_int(n) and n >= 1) and len(v) >= 1
                                  and len(set(v)) == len(v)),
    "tune.space.schedule": Rule(f"a list of 1 or more of {', '.join(CHOICES['optimizer.schedule'])}",
                                lambda v: is_list(v, lambda s: s in CHOICES["optimizer.schedule"]) and len(v) >= 1
                                and len(set(v)) == len(v)),
    "tune.space.max_shift.low": NON_NEGATIVE_INT,
    "tune.space.max_shift.high": NON_NEGATIVE_INT,
    # compare.py
    "sweep_id": NAME_OR_NULL,
    "filter": NAME_OR_NULL,
    "output_dir": NAME_OR_NULL,
    "register": BOOL,
    "stale_after_minutes": Rule("a number > 0", lambda v: is_number(v) and v > 0),
    # predict.py
    "images": Rule("a file, a folder or a glob, e.g. images=my_digits/", is_name),
    "recursive": BOOL,
    "model_uri": NAME_OR_NULL,
    "run_id": NAME_OR_NULL,
    "explain": Rule(f"{choice('explain').expect} (true: maps, false: off)",  # a bool arrives as 'True' / 'False'
                    lambda v: v in CHOICES["explain"] or str(v).lower() in ("true", "false")),
    "batch_size": AT_LEAST_ONE,
    # demo.py
    "port": Rule("an integer in 1..65535 or null (a free one)", lambda v: v is None or is_int(v) and 1 <= v <= 65535),
    "method": choice("method"),
}

# --- Messages ------------------------------------------------------------------------------------------


def shown(value: Any) -> str:
    """The value as the message shows it: strings quoted, lists as lists."""
    return repr(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def bad(key: str, expect: str, value: Any, where: str = "") -> UserError:
    return UserError(f"{key} must be {expect}, got {shown(value)}{where}.")


def unknown_key(key: str, schema: Any) -> str:
    """``key`` is no setting of its group (whose type is ``schema``): the nearest name, or all of them."""
    prefix, _, name = key.rpartition(".")
    names = [f.name for f in fields(schema)] if is_dataclass(schema) else []
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"{key} is not a setting; did you mean {prefix + '.' * bool(prefix)}{close[0]}?"
    known = f"; {prefix or 'the top level'} has {', '.join(names)}" if names else ""
    return f"{key} is not a setting{known}."


def unset(key: str) -> UserError:
    """``key`` has no value: removed with ``~key``, or left as ``???``."""
    return UserError(f"{key} must be {RULES[key].expect if key in RULES else 'set'}, got nothing.")


def composition_error(error: Exception) -> str:
    """One line for what Hydra could not compose (a ``ConfigCompositionException`` or an
    ``OverrideParseException``): an unknown option of a group, a key that is no setting, a value of
    the wrong type (an item of a list judged by the list's rule); else the first line of Hydra's message."""
    cause = error.__cause__
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return (f"{group} must be one of {', '.join(sorted(error.options))}, got {option!r} "
                f"(no config {error.missing_cfg_file}).")
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and cause.full_key:
        return unknown_key(cause.full_key, cause.object_type)
    full_key = getattr(cause, "full_key", None) or ""
    key = re.sub(r"\[\d+\]$", "", full_key)
    if isinstance(cause, ValidationError) and key in RULES:
        return str(bad(key, RULES[key].expect, cause.value, f" at {full_key}" * (key != full_key)))
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, OverrideParseException):
        return f"cannot parse {error.override!r}: {first_line}."
    return first_line


# --- Checks: one function per group ---------------------------------------------------------------------


def require(node: DictConfig, key: str) -> None:
    """The value of ``key`` (its last part, in ``node``) passes ``RULES[key]``; an absent key passes
    (``check_keys`` speaks for the typed config; an untyped, logged one may predate a setting)."""
    name = key.rpartition(".")[2]
    if name in node and not RULES[key].ok(node[name]):
        raise bad(key, RULES[key].expect, node[name])


def check_keys(cfg: DictConfig) -> None:
    """Every setting has a value, and each node that has a schema holds exactly its schema's settings:
    Hydra leaves ``key=???`` unset, removes ``~key`` and appends ``+typo=1`` without a word."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise unset(missing[0])
    check_schema_keys(cfg)


def check_schema_keys(cfg: DictConfig, prefix: str = "") -> None:
    """``check_keys`` for ``cfg``, found at ``prefix``, and the nodes below it."""
    keys = list(cfg)
    schema = OmegaConf.get_type(cfg)
    if is_dataclass(schema):
        names = [f.name for f in fields(schema)]
        for key in keys:
            if key not in names:
                raise UserError(unknown_key(f"{prefix}{key}", schema))
        for name in names:
            if name not in keys:
                raise unset(f"{prefix}{name}")
    for key in keys:
        if isinstance(cfg[key], DictConfig):
            check_schema_keys(cfg[key], f"{prefix}{key}.")


def check_run(cfg: DictConfig) -> None:
    """seed, resume, sweep_resume."""
    for key in ("seed", "resume", "sweep_resume"):
        require(cfg, key)


def check_tracking(tracking: DictConfig) -> None:
    """tracking.uri a store MLflow 3.17 opens, tracking.experiment a name: before any MLflow call.
    compare.py and predict.py share this group: they can call this on their ``cfg.tracking``."""
    uri = tracking.get("uri")
    if isinstance(uri, str) and uri.strip() and (uri.startswith("file:") or urlsplit(uri).scheme == ""):  # a path
        raise UserError(f"tracking.uri {uri!r} is a file store, which MLflow 3.17 refuses; use a sqlite "
                        "database, e.g. tracking.uri=sqlite:///mlflow.db (relative to the project root).")
    for key in ("uri", "experiment", "local_dir"):
        require(tracking, f"tracking.{key}")


def check_trainer(trainer: DictConfig) -> None:
    for key in ("epochs", "batch_size", "steps_per_execution", "xla", "gradcheck", "strategy", "keep", "plots"):
        require(trainer, f"trainer.{key}")


def check_optimizer(optimizer: DictConfig) -> None:
    """The values, and the name matching the group's kind: only SGD has a momentum."""
    for key in ("name", "learning_rate", "schedule", "warmup_epochs", "weight_decay", "momentum"):
        require(optimizer, f"optimizer.{key}")
    if optimizer.name == "sgd" and "momentum" not in optimizer:
        raise UserError("optimizer.name 'sgd' needs optimizer.momentum: choose SGD with optimizer=sgd.")
    if optimizer.name == "adam" and "momentum" in optimizer:
        raise UserError("optimizer.name 'adam' takes no optimizer.momentum: choose Adam with optimizer=adam.")


def check_warmup(cfg: DictConfig) -> None:
    """The warm-up ends before the last epoch: the schedule's decay needs steps."""
    warmup = cfg.optimizer.get("warmup_epochs", 0)
    if warmup >= cfg.trainer.epochs:
        raise bad("optimizer.warmup_epochs", f"less than trainer.epochs ({cfg.trainer.epochs})", warmup)


def check_data(data: DictConfig) -> None:
    """The values, then what depends on other settings: the source's own settings, one mean and std
    per image channel, a shift smaller than the image."""
    for key in RULES:
        if key.startswith("data."):
            require(data, key)
    if data.source == "npz":
        for key, expect in NPZ_NEEDS.items():
            if data.get(key) is None:
                raise bad(f"data.{key}", f"{expect} with data.source=npz", None)
    elif data.name not in KERAS_DATASETS:
        raise bad("data.name", f"one of {', '.join(KERAS_DATASETS)} with data.source=keras", data.name)
    height, width, channels = data.input_shape
    for key in ("mean", "std"):
        if len(data[key]) != channels:
            raise bad(f"data.{key}", f"{channels} number{'s' * (channels != 1)}, one per channel of data.input_shape "
                      f"{shown(data.input_shape)}", data[key])
    if data.max_shift >= min(height, width):
        raise bad("data.max_shift", f"smaller than the images ({height}x{width} pixels)", data.max_shift)


def check_model(model: DictConfig) -> None:
    """The values, and an architecture that models/architectures.py builds (imported here, last: Keras
    takes seconds to import)."""
    for key in ("name", "architecture", "layers"):
        require(model, f"model.{key}")
    from models.architectures import ARCHITECTURES

    if model.architecture not in ARCHITECTURES:
        raise bad("model.architecture", f"one of {sorted(ARCHITECTURES)}", model.architecture)


def check_value(key: str, value: Any, shown: str | None = None) -> None:
    """``value`` passes ``RULES[key]`` (for in-process callers that pass settings one by one; named ``shown`` where
    the user set it elsewhere)."""
    if not RULES[key].ok(value):
        raise bad(shown or key, RULES[key].expect, value)


def check_hparams(cfg: DictConfig) -> None:
    """hparams=tuned (conf/hparams/tuned.yaml): its settings, then the study it reads, while the values taken from
    the study (``${tuned:<key>}``) are still unread: no such study for this model and dataset, no finished trial in
    it, another optimizer than it tuned, is one line (``experiments.store.studies.tuned_setting``)."""
    hparams = cfg.get("hparams")
    if hparams is None:
        return
    for key in ("study", "storage", "trial"):
        require(hparams, f"hparams.{key}")
    from experiments.store.studies import reads_study, tuned_setting

    if studies_read and reads_study(cfg):  # not a resumed run's logged config, whose values are already there
        tuned_setting(cfg)


# While CheckConfig checks the settings a sweep's jobs share, no study is read (each job reads its own model's, and
# the sweep may vary the model): ${tuned:...} stands for these valid values.
studies_read = True
STAND_INS = {"optimizer.learning_rate": 1e-3, "optimizer.weight_decay": 0.0, "optimizer.schedule": "constant",
             "trainer.batch_size": 1, "data.max_shift": 0}


def tuned(key: str, _root_: DictConfig) -> Any:
    """``${tuned:<key>}``: the value of the setting ``key`` (e.g. optimizer.learning_rate) in the study's trial that
    ``hparams`` names (the best one by default), read once per process (``experiments.store.studies``)."""
    if not studies_read:
        return STAND_INS[key]
    from experiments.store.studies import tuned_setting

    return tuned_setting(_root_).values[key]


OmegaConf.register_new_resolver("tuned", tuned, replace=True)


def check(cfg: DictConfig) -> None:
    """Every setting of a train.py config, group by group; the first problem is a one-line UserError."""
    check_hparams(cfg)  # first: the others read values that may come from a study
    check_keys(cfg)
    check_run(cfg)
    check_tracking(cfg.tracking)
    check_trainer(cfg.trainer)
    check_optimizer(cfg.optimizer)
    check_warmup(cfg)
    check_data(cfg.data)
    check_model(cfg.model)


def check_range(space: DictConfig, name: str) -> None:
    """tune.space.<name>: low <= high; a log scale starts above 0."""
    node = space[name]
    if node.high < node.low:
        raise bad(f"tune.space.{name}.high", f">= tune.space.{name}.low ({node.low})", node.high)
    if node.get("log") and node.low <= 0:
        raise bad(f"tune.space.{name}.low", f"> 0 with tune.space.{name}.log=true", node.low)


def check_tune(cfg: DictConfig) -> None:
    """tune.py: the groups it shares with train.py, checked as train.py checks them, then ``tune`` and its search
    space; the images must stay larger than the largest shift, a tracking server needs tune.storage."""
    check_keys(cfg)
    for key in RULES:  # first: trainer.epochs is tune.epochs
        if key.startswith("tune."):
            require(OmegaConf.select(cfg, key.rpartition(".")[0]), key)
    check(cfg)
    for name in ("learning_rate", "weight_decay", "max_shift"):
        check_range(cfg.tune.space, name)
    height, width, _ = cfg.data.input_shape
    if cfg.tune.space.max_shift.high >= min(height, width):
        raise bad("tune.space.max_shift.high", f"smaller than the images ({height}x{width} pixels)",
                  cfg.tune.space.max_shift.high)
    if cfg.trainer.strategy == "multi_worker":
        raise UserError("trainer.strategy multi_worker is not for tuning: start several tune.py processes on one "
                        "study instead (docs/tuning.md).")
    from experiments.store.studies import storage_url

    storage_url(cfg.tune.storage, cfg.tracking.uri, "tune.storage")  # a tracking server needs tune.storage


def check_settings(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """The keys and their values of a command without groups of its own but ``tracking``."""
    check_keys(cfg)
    check_tracking(cfg.tracking)
    for key in keys:
        require(cfg, key)


def check_compare(cfg: DictConfig) -> None:
    check_settings(cfg, ("sweep_id", "filter", "output_dir", "register", "stale_after_minutes"))


def check_predict(cfg: DictConfig) -> None:
    check_settings(cfg, ("images", "recursive", "model_uri", "run_id", "explain", "batch_size", "output_dir"))
    require(cfg.model, "model.name")


def check_demo(cfg: DictConfig) -> None:
    check_settings(cfg, ("port", "method"))


CHECKS = {"train": check, "tune": check_tune, "compare": check_compare, "predict": check_predict, "demo": check_demo}


def check_tuning_first(config: DictConfig) -> None:
    """The budget of a sweep that tunes its models first (``experiments.apps.tune.TuneEachModel``, conf/experiment/
    fair_comparison.yaml), which trains them at the setting found: hparams=tuned."""
    tune = OmegaConf.select(config, "hydra.callbacks.tune")
    if tune is None:
        return
    for key in ("trials", "epochs"):
        check_value(f"tune.{key}", tune.get(key), f"hydra.callbacks.tune.{key}")
    if config.get("hparams") is None:
        raise UserError("hydra.callbacks.tune tunes the models to train them at the setting found: add hparams=tuned.")


class CheckConfig(Callback):
    """The first Hydra callback of every command: a bad setting stops it with ``error: <the problem>`` and exit
    code 2 before anything else (for train.py: before any job, the sweep's parent run or a resumed run's
    look-up)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check_or_exit(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global studies_read
        studies_read = False  # each job reads its own model's study (hparams=tuned)
        try:
            self.check_or_exit(config)  # the settings every job shares; each job checks its swept values itself
        finally:
            studies_read = True

    @staticmethod
    def check_or_exit(config: DictConfig) -> None:
        """The command's check of the job's settings (the callbacks' config also holds Hydra's own, some unset
        yet)."""
        command = config.hydra.job.config_name
        job = copy.deepcopy(config)
        with read_write(job), open_dict(job):
            del job["hydra"]
        try:
            CHECKS[command](job)
            check_tuning_first(config)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)  # Hydra turns an exception in a callback into a warning; SystemExit passes
