"""Where tuning studies live and what they hold: one Optuna study per architecture and dataset, in an Optuna RDB
storage beside the tracking store (docs/tuning.md).

| tracking store (``tracking.uri``)    | its studies (``tune.storage`` / ``hparams.storage`` null)                    |
|--------------------------------------|-----------------------------------------------------------------------------|
| ``sqlite:///<folder>/mlflow.db``     | ``sqlite:///<folder>/optuna.db``                                            |
| ``postgresql://<server>/<database>`` | ``postgresql://<server>/<database>_optuna``: the same server, own database  |
| ``http(s)://`` (a tracking server)   | none: give ``tune.storage=<sqlite:///... or postgresql://...>``             |

An Optuna storage cannot share MLflow's database: both keep their schema's version in a table named
``alembic_version``, and Optuna refuses a database whose version it does not know.

A study is named ``<tune.study>-<data.name>-<model.name>`` (``default-mnist-lenet``). It records, as user attributes,
the settings that make its trials comparable (``SETTINGS_ATTR``: all but the budget, the test split, where things
are stored and how a run executes), its MLflow parent run, and each trial its MLflow run and its process.

The budget counts COMPLETE and PRUNED trials (``COUNTED``). A process takes a trial's slot under the storage's lock
(``Claim``: a lock file beside a sqlite file, an advisory lock on PostgreSQL) from the count to the trial's creation,
counting the trials RUNNING too, so processes sharing a study never start more trials than the budget leaves.
A trial whose process is gone does not hold its slot: this host's by their pid at once, any host's once their
heartbeat is ``GRACE_SECONDS`` old (``fail_dead_trials``); they end FAIL, and FAIL trials do not count: the setting of
a FAIL trial is tried again, once, before new ones are drawn (``retry_failed``).

``hparams=tuned`` (conf/hparams/tuned.yaml) reads a study's best trial through ``tuned_setting``, once per process.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import socket
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState

from experiments.errors import UserError
from experiments.store.runs import BUDGET_TAG, STUDY_TAG, process_alive, process_tags
from experiments.store.tracking import SERVER, SQLITE, is_database, resolve_tracking_uri, shown_uri, sqlite_path

FILE = "optuna.db"  # beside a sqlite tracking store
DATABASE_SUFFIX = "_optuna"  # the database beside a PostgreSQL tracking store's, on the same server
# Each trial's process writes its heartbeat every HEARTBEAT_SECONDS; a RUNNING trial whose last one is older than
# GRACE_SECONDS counts as dead (any host; this host's dead processes are found at once by their pid).
HEARTBEAT_SECONDS = 10
GRACE_SECONDS = 60
# The setting each key of tune.space tunes; a trial's params are named by the setting.
TUNED = {"learning_rate": "optimizer.learning_rate", "weight_decay": "optimizer.weight_decay",
         "batch_size": "trainer.batch_size", "schedule": "optimizer.schedule", "max_shift": "data.max_shift"}
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # what the budget (tune.trials) counts
TRAIN_GROUPS = ("data", "model", "optimizer", "trainer", "tracking", "seed")  # a trial's config: a train.py config
# Not part of what a study is: the budget, where things are stored, how a run executes, the test split (no trial
# sees it); the tuned settings' own values (each trial sets them).
NOT_SETTINGS = ("tune.trials", "tune.storage", "tune.study", "tracking.", "trainer.epochs", "data.test_size",
                "trainer.steps_per_execution", "trainer.xla", "trainer.gradcheck", "trainer.strategy", *TUNED.values())
SETTINGS_ATTR = "settings"  # study user attributes
PARENT_RUN_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"  # trial user attributes; also host, pid, pid_started (``process_tags``)
STOPPED_ATTR = "stopped"
RETRY_ATTR = "retry_of"  # a trial that tries the setting of a FAIL trial again

optuna.logging.set_verbosity(optuna.logging.ERROR)  # tune.py prints a line per trial itself


# --- Where a study lives -----------------------------------------------------------------------------------


def study_name(prefix: str, data_name: str, model_name: str) -> str:
    return f"{prefix}-{data_name}-{model_name}"


def storage_url(storage: str | None, tracking_uri: str | None, key: str) -> str:
    """The Optuna storage URL for ``storage`` (the setting ``key``, a relative sqlite path taken from the project
    root), or when it is null the one beside the tracking store (the module's table); a tracking server keeps no
    study: then ``key`` must be given (UserError)."""
    if storage:
        return resolve_tracking_uri(storage)
    uri = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None:
        return f"{SQLITE}{db.with_name(FILE)}"
    if is_database(uri):
        parts = urlsplit(uri)
        return urlunsplit(parts._replace(path=f"/{parts.path.lstrip('/')}{DATABASE_SUFFIX}"))
    if uri.startswith(SERVER):
        raise UserError(f"{key} must be sqlite:///<path> or postgresql://<host>/<database> with a tracking server "
                        f"(tracking.uri={shown_uri(uri)} keeps no study), got None.")
    raise UserError(f"{key}: no Optuna storage beside tracking.uri={shown_uri(uri)}; give {key}=sqlite:///<path>.")


def engine_options(url: str) -> dict:
    """Waits for a busy sqlite file (processes sharing a study write to it) or a slow server, instead of failing."""
    if url.startswith(SQLITE):
        return {"connect_args": {"timeout": 60}}
    return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}


def open_storage(url: str, heartbeat: bool) -> optuna.storages.RDBStorage:
    """The RDB storage at ``url``, its tables created if new; ``heartbeat``: for trials that run (tune.py). A
    PostgreSQL database beside the tracking store's is created when missing (``create_database``)."""
    db = sqlite_path(url)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    elif is_database(url):
        create_database(url)
    beats = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS} if heartbeat else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeat_interval
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url), **beats)
        except Exception as e:  # sqlalchemy's OperationalError (unreachable, refused), ImportError (no driver)
            if isinstance(e, UserError):
                raise
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise UserError(f"the study storage {shown_uri(url)} cannot be opened ({reason}).") from None


def create_database(url: str) -> None:
    """A PostgreSQL storage's database, created on its server when it does not exist (the tracking database's
    login needs the CREATEDB privilege for that; else create it once: ``createdb <name>``)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    options = {"poolclass": NullPool, "connect_args": {"connect_timeout": 10}}
    try:
        engine = sqlalchemy.create_engine(url, **options)
        with engine.connect():
            return
    except sqlalchemy.exc.OperationalError as e:
        if "does not exist" not in str(e):
            return  # open_storage reports it
    server = sqlalchemy.create_engine(urlunsplit(parts._replace(path="/postgres")), isolation_level="AUTOCOMMIT",
                                      **options)
    try:
        with server.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.SQLAlchemyError as e:
        if "already exists" not in str(e) and "pg_database_datname_index" not in str(e):  # not another process's
            raise UserError(f"the study storage {shown_uri(url)}: its database {name!r} does not exist and cannot be "
                            f"created ({str(getattr(e, 'orig', e)).strip().splitlines()[0]}); create it once with: "
                            f"createdb {name}") from None


class Claim:
    """The storage's lock, held from the budget's count to the new trial's creation: processes sharing a study take
    its last slots one at a time. A lock file beside a sqlite file (``flock``: processes of one machine, as sqlite
    itself needs); a session advisory lock on PostgreSQL. The trial releases it as it starts (``release``)."""

    KEY = 0x6C656E6574  # the advisory lock's number: one per database

    def __init__(self, url: str):
        self.url, self.file, self.connection = url, None, None

    def __enter__(self) -> Claim:
        db = sqlite_path(self.url)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(db.with_name(db.name + ".lock"), "w")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        else:
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            create_database(self.url)
            engine = sqlalchemy.create_engine(self.url, poolclass=NullPool, **engine_options(self.url))
            self.connection = engine.connect()
            self.connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.KEY})
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
        if self.connection is not None:
            import sqlalchemy

            with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                self.connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.KEY})
            self.connection.close()  # ends the session: the lock goes with it in any case
            self.connection = None

    def __exit__(self, *exc) -> None:
        self.release()


# --- A study and its trials --------------------------------------------------------------------------------


def study_settings(cfg: DictConfig) -> dict[str, str]:
    """What makes a study's trials comparable: the tune.py config flattened, less ``NOT_SETTINGS``."""
    flat = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = json.dumps(node)

    visit(OmegaConf.to_container(cfg, resolve=True), "")
    return {key: value for key, value in flat.items()
            if not any(key == skip or skip.endswith(".") and key.startswith(skip) for skip in NOT_SETTINGS)}


def make_sampler(seed: int, startup_trials: int, number: int) -> optuna.samplers.TPESampler:
    """TPE for the trial numbered ``number``, seeded from ``seed`` and the number: processes sharing a study (same
    seed) draw different settings, the same history the same ones, and every architecture's study the same random
    first ``startup_trials`` (a paired start); with ``constant_liar`` it steers away from trials still running."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # constant_liar
        return optuna.samplers.TPESampler(seed=(seed * 1_000_003 + number) % 2**32, n_startup_trials=startup_trials,
                                          constant_liar=True)


def make_pruner(tune: DictConfig) -> optuna.pruners.BasePruner:
    """tune.pruner: median (a trial whose validation accuracy at an epoch is below the median of the earlier trials'
    at that epoch stops there, once ``tune.startup_trials`` trials have finished), hyperband (successive halving over
    epochs 1 to tune.epochs, reduction factor 3) or none."""
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=0)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(storage: optuna.storages.RDBStorage, name: str, cfg: DictConfig) -> optuna.Study:
    """The study ``name`` (created when new, with the settings of ``cfg``); refused (UserError) when it was begun
    with other settings: its trials would not be comparable. Call it holding the ``Claim``."""
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                sampler=make_sampler(cfg.seed, cfg.tune.startup_trials, 0),
                                pruner=make_pruner(cfg.tune), load_if_exists=True)
    settings = study_settings(cfg)
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
        return study
    for key in sorted(set(recorded) | set(settings)):
        if recorded.get(key) != settings.get(key):
            was, now = (json.loads(v) if v is not None else "nothing" for v in (recorded.get(key), settings.get(key)))
            raise UserError(f"study {name} was begun with {key}={was}, this run has {now}: its trials would not be "
                            f"comparable; keep the study's settings, or begin another study with tune.study=<name>.")
    return study


def counts(study: optuna.Study) -> tuple[int, int]:
    """(trials that count, trials running)."""
    trials = study.get_trials(deepcopy=False, states=(*COUNTED, TrialState.RUNNING))
    running = sum(trial.state == TrialState.RUNNING for trial in trials)
    return len(trials) - running, running


def fail_dead_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The RUNNING trials whose process is gone, now FAIL: this host's by their pid, any host's by their heartbeat;
    returns them (their MLflow runs are the caller's)."""
    host = socket.gethostname()
    running = {trial.number: trial for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for trial in running.values():
        attrs = trial.user_attrs
        if attrs.get("host") == host and str(attrs.get("pid", "")).isdigit() and not process_alive(attrs):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    still = {trial.number for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return [trial for number, trial in running.items() if number not in still]


def retry_failed(study: optuna.Study) -> None:
    """Each FAIL trial's setting (interrupted, or its process died) is tried once more, next (Optuna's
    ``enqueue_trial``: the following trials take queued settings first), so that a study interrupted and resumed
    tries the settings the uninterrupted one would have. A retry that fails too is not retried. Call it holding the
    ``Claim``."""
    trials = study.get_trials(deepcopy=False)
    retried = {trial.user_attrs.get(RETRY_ATTR) for trial in trials}
    for trial in trials:
        if (trial.state == TrialState.FAIL and trial.params and trial.number not in retried
                and RETRY_ATTR not in trial.user_attrs):
            study.enqueue_trial(trial.params, user_attrs={RETRY_ATTR: trial.number})


def mark_trial_process(trial: optuna.Trial) -> None:
    """Which process runs the trial (``fail_dead_trials``)."""
    for key, value in process_tags().items():
        trial.set_user_attr(key, value)


def suggest(trial: optuna.Trial, space: DictConfig) -> dict[str, Any]:
    """The trial's setting from the search space, by the setting each key tunes (``TUNED``)."""
    rate, decay, shift = space.learning_rate, space.weight_decay, space.max_shift
    return {
        TUNED["learning_rate"]: trial.suggest_float(TUNED["learning_rate"], rate.low, rate.high, log=rate.log),
        TUNED["weight_decay"]: trial.suggest_float(TUNED["weight_decay"], decay.low, decay.high, log=decay.log),
        TUNED["batch_size"]: trial.suggest_categorical(TUNED["batch_size"], list(space.batch_size)),
        TUNED["schedule"]: trial.suggest_categorical(TUNED["schedule"], list(space.schedule)),
        TUNED["max_shift"]: trial.suggest_int(TUNED["max_shift"], shift.low, shift.high),
    }


def trial_config(cfg: DictConfig, setting: dict[str, Any]) -> DictConfig:
    """A trial's config: a train.py config (its groups and seed from tune.py's) with the trial's ``setting`` and
    tune.epochs epochs."""
    trial = OmegaConf.masked_copy(cfg, list(TRAIN_GROUPS))
    for key, value in setting.items():
        OmegaConf.update(trial, key, value, merge=False)
    trial.trainer.epochs = cfg.tune.epochs
    return trial


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The COMPLETE trial with the highest validation accuracy (ties: the earliest), None before the first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda trial: (trial.value, -trial.number), default=None)


# --- hparams=tuned -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TunedSetting:
    """A study's trial as train.py hparams=tuned uses it."""

    study: str
    storage: str  # as shown (no password)
    trial: int
    value: float  # its validation accuracy
    run_id: str | None  # its MLflow run
    values: dict[str, Any]  # setting -> value, for every key of TUNED
    budget: str  # what the study had spent when read: "<trials counted> trials x <tune.epochs> epochs"


def reads_study(cfg: DictConfig) -> bool:
    """Whether a tuned setting still comes from the study (``${tuned:...}``; a run's logged config has the values)."""
    for key in TUNED.values():
        group, _, name = key.rpartition(".")
        node = cfg.get(group)
        if isinstance(node, DictConfig) and name in node and OmegaConf.is_interpolation(node, name):
            return True
    return False


def tuned_setting(cfg: DictConfig) -> TunedSetting:
    """The trial that ``cfg.hparams`` names (the best one when hparams.trial is null) of the study of cfg's model
    and dataset; one line (UserError) when there is no such study or trial, or the run's optimizer is not the one the
    study tuned (its learning rates mean something else)."""
    hparams = cfg.get("hparams")
    if hparams is None:
        raise UserError("${tuned:...} takes its values from a study: choose it with hparams=tuned.")
    url = storage_url(hparams.storage, cfg.tracking.uri, "hparams.storage")
    return read_setting(url, hparams.study, cfg.data.name, cfg.model.name, hparams.trial, cfg.optimizer.name)


@functools.cache
def read_setting(url: str, prefix: str, data_name: str, model_name: str, number: int | None,
                 optimizer: str) -> TunedSetting:
    """``tuned_setting``'s look-up, once per process: every value of a run (and the jobs of a sweep run in one
    process) comes from the same trial, however the study grows meanwhile."""
    name = study_name(prefix, data_name, model_name)
    shown = shown_uri(url)
    missing = (f"hparams=tuned: no study {name} (model {model_name} on {data_name}) in {shown}; tune it first: "
               f"python tune.py model={model_name} data={data_name}" + f" tune.study={prefix}" * (prefix != "default"))
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise UserError(missing)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url, heartbeat=False))
    except KeyError:
        raise UserError(missing) from None
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if number is None:
        trial = best_trial(study)
        if trial is None:
            raise UserError(f"hparams=tuned: study {name} in {shown} has no finished trial yet; let python tune.py "
                            f"model={model_name} finish one.")
    else:
        trial = next((t for t in complete if t.number == number), None)
        if trial is None:
            numbers = ", ".join(str(t.number) for t in complete) or "none"
            raise UserError(f"hparams.trial must be a finished trial of study {name}, got {number} (its finished "
                            f"trials: {numbers}).")
    tuned_with = json.loads(study.user_attrs.get(SETTINGS_ATTR, {}).get("optimizer.name", json.dumps(optimizer)))
    if tuned_with != optimizer:
        raise UserError(f"hparams=tuned: study {name} tuned optimizer={tuned_with}, this run has "
                        f"optimizer={optimizer}; train with optimizer={tuned_with}, or tune {optimizer} in another "
                        "study.")
    epochs = json.loads(study.user_attrs.get(SETTINGS_ATTR, {}).get("tune.epochs", "null"))
    budget = f"{len(study.get_trials(deepcopy=False, states=COUNTED))} trials x {epochs} epochs"
    return TunedSetting(name, shown, trial.number, float(trial.value), trial.user_attrs.get(RUN_ATTR),
                        {key: trial.params[key] for key in TUNED.values()}, budget)


def tuned_tags(cfg: DictConfig) -> dict[str, str]:
    """The tags of a train.py run whose setting comes from a study: which study and trial, and the study's budget
    (none when no value is read from one)."""
    if cfg.get("hparams") is None or not reads_study(cfg):
        return {}
    setting = tuned_setting(cfg)
    tags = {STUDY_TAG: setting.study, "hparams.trial": str(setting.trial), "hparams.storage": setting.storage,
            "hparams.val_accuracy": f"{setting.value:.6g}", BUDGET_TAG: setting.budget}
    if setting.run_id:
        tags["hparams.trial_run_id"] = setting.run_id
    return tags
