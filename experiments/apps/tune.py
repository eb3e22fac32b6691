"""What ``python tune.py`` does: tune one architecture's hyperparameters (learning rate, weight decay, batch size,
schedule, augmentation) with a fixed budget of trials, so that architectures compare at their best, each given the
same number of tries (docs/tuning.md).

The study (Optuna, ``experiments.store.studies``) lives beside the tracking store; in MLflow it is one parent run
(tagged ``tune.parent=true``) in experiment ``tracking.experiment`` (tune.yaml: lenet-lab-tuning, apart from train.py's
runs), and each trial a child run of it (``experiments.run.trial``: validation only, nothing of the test split).

| how it ends                                  | printed                                               | exit        |
|----------------------------------------------|-------------------------------------------------------|-------------|
| the study has its tune.trials trials         | the best trial and the command that trains it         | 0           |
| a bad setting, a study begun otherwise       | ``error: ...`` (stderr)                               | 2           |
| a trial failed (a diverged loss is pruned)   | ``error: ...; the run is marked FAILED``              | 1           |
| Ctrl-C / SIGTERM / SIGUSR2                   | ``interrupted: ...; run the same command to go on``   | 130/143/140 |

The parent run ends FINISHED once the study has its budget, KILLED when its last process stopped short of it; a
process that leaves trials of other processes running leaves it RUNNING to them. The same command again (or with a
larger tune.trials) goes on where the study stopped.
"""

from __future__ import annotations

import contextlib
import functools
import time

import optuna
from hydra import compose
from hydra.core.override_parser.types import Override
from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from experiments.config import check_tune
from experiments.errors import stop, stop_in_callback
from experiments.run.lifecycle import Interrupted, catch_interrupts, interruption
from experiments.run.sweep import sweep_overrides, swept_values
from experiments.store import studies
from experiments.store.runs import mark_dead_runs
from experiments.store.tracking import check_store, flatten_config, setup_experiment, shown_uri

PARENT_TAG = "tune.parent"


def parent_run(client: MlflowClient, study: optuna.Study, experiment_id: str, cfg: DictConfig) -> str:
    """The study's MLflow parent run, created with the study (its settings as params), RUNNING again when the study
    goes on. Call it holding the ``Claim``."""
    run_id = study.user_attrs.get(studies.PARENT_RUN_ATTR)
    if run_id:
        with contextlib.suppress(MlflowException):
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                if run.info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
                client.set_tag(run_id, "tune.trials", str(cfg.tune.trials))
                return run_id
    tags = {PARENT_TAG: "true", "tune.study": study.study_name, "tune.storage": shown_uri(storage(cfg)),
            "tune.trials": str(cfg.tune.trials), "model": cfg.model.name, "architecture": cfg.model.architecture,
            "layers": cfg.model.layers, "dataset": cfg.data.name,
            "mlflow.note.content": f"Tuning study {study.study_name}: {cfg.model.name} on {cfg.data.name}, "
                                   f"{cfg.tune.epochs} epochs per trial; its trials are the child runs."}
    run = client.create_run(experiment_id, run_name=f"tune-{study.study_name}", tags=tags)
    params = {key: value for key, value in flatten_config(cfg).items()
              if key.startswith("tune.") and key not in ("tune.trials", "tune.storage")}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    study.set_user_attr(studies.PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id


def storage(cfg: DictConfig) -> str:
    return studies.storage_url(cfg.tune.storage, cfg.tracking.uri, "tune.storage")


def end_dead_runs(client: MlflowClient, trials: list) -> None:
    """The MLflow runs of trials whose process is gone (``studies.fail_dead_trials``), KILLED if still RUNNING."""
    for trial in trials:
        run_id = trial.user_attrs.get(studies.RUN_ATTR)
        with contextlib.suppress(MlflowException):
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "error", f"trial {trial.number}: its process stopped")
                client.set_terminated(run_id, "KILLED")


def objective(trial: optuna.Trial, claim: studies.Claim, cfg: DictConfig, parent_run_id: str,
              started: list[int]) -> float:
    """One trial: its process recorded, the slot's lock let go, its setting drawn (or the one it retries), its run
    trained and validated; its number appended to ``started``. A diverged loss prunes it (its run FAILED): a setting
    that diverges counts against the budget as a bad one."""
    from experiments.run.callbacks import Diverged
    from experiments.run.trial import train_and_validate

    started.append(trial.number)
    studies.mark_trial_process(trial)
    claim.release()
    setting = studies.suggest(trial, cfg.tune.space)
    tags = {"tune.study": trial.study.study_name, "tune.trial": str(trial.number)}
    try:
        result = train_and_validate(studies.trial_config(cfg, setting), trial, parent_run_id, tags)
    except Diverged as e:
        trial.set_user_attr(studies.STOPPED_ATTR, f"diverged: {e}")
        run_id = trial.user_attrs.get(studies.RUN_ATTR)
        if run_id:
            MlflowClient().set_tag(run_id, "tune.pruned", "diverged")
        raise optuna.TrialPruned(str(e)) from None
    if result.pruned:
        trial.set_user_attr(studies.STOPPED_ATTR, f"pruned after epoch {result.epochs} of {cfg.tune.epochs}")
        raise optuna.TrialPruned(f"pruned after epoch {result.epochs}")
    return result.val_accuracy


def describe(setting: dict) -> str:
    return " ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in setting.items())


def report(study: optuna.Study, number: int, budget: int) -> None:
    """One line for the trial this process just ran."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    counted, _ = studies.counts(study)
    run = trial.user_attrs.get(studies.RUN_ATTR, "-")
    if trial.state == optuna.trial.TrialState.COMPLETE:
        outcome = f"val_accuracy {trial.value:.4f}"
    else:
        outcome = trial.user_attrs.get(studies.STOPPED_ATTR, trial.state.name.lower())
    print(f"trial {number} ({counted} of {budget}): {outcome}; {describe(trial.params)} (run {run})", flush=True)


def record_best(client: MlflowClient, study: optuna.Study, parent_run_id: str) -> optuna.trial.FrozenTrial | None:
    """The study's best trial so far, on its parent run: metric best_val_accuracy (step: the trials counted) and
    tags tune.best_trial, tune.best_run_id, best.<setting>."""
    best = studies.best_trial(study)
    counted, _ = studies.counts(study)
    client.log_metric(parent_run_id, "trials_counted", counted, step=counted)
    if best is not None:
        client.log_metric(parent_run_id, "best_val_accuracy", best.value, step=counted)
        client.set_tag(parent_run_id, "tune.best_trial", str(best.number))
        client.set_tag(parent_run_id, "tune.best_run_id", best.user_attrs.get(studies.RUN_ATTR, ""))
        for key, value in best.params.items():
            client.set_tag(parent_run_id, f"best.{key}", str(value))
    return best


def end_parent(client: MlflowClient, study: optuna.Study, parent_run_id: str, budget: int) -> None:
    """FINISHED with its budget, else KILLED, unless another process still runs one of its trials (that one
    ends it)."""
    counted, running = studies.counts(study)
    if running:
        return
    with contextlib.suppress(MlflowException):
        client.set_terminated(parent_run_id, "FINISHED" if counted >= budget else "KILLED")


def tune(cfg: DictConfig) -> float | None:
    """Run trials of the study of cfg's model and dataset until it has tune.trials of them (together with every
    other process on it); returns the best validation accuracy (None without a finished trial)."""
    check_tune(cfg)  # in-process callers too
    check_store(cfg.tracking.uri)  # a tracking server or database that does not answer: one line, before any work
    url, budget = storage(cfg), cfg.tune.trials
    name = studies.study_name(cfg.tune.study, cfg.data.name, cfg.model.name)
    with studies.Claim(url):  # processes starting together on new stores create each once (MLflow's tables too)
        experiment_id = setup_experiment(cfg.tracking.uri, cfg.tracking.experiment)
        client = MlflowClient()
        mark_dead_runs(client, [experiment_id])
        study = studies.open_study(studies.open_storage(url, heartbeat=True), name, cfg)
        parent_run_id = parent_run(client, study, experiment_id, cfg)
    counted, running = studies.counts(study)
    epochs = f"{cfg.tune.epochs} epoch{'s' * (cfg.tune.epochs != 1)}"
    print(f"study {name}: {counted} of {budget} trials done, {running} running elsewhere; {epochs} each, pruner "
          f"{cfg.tune.pruner} → parent run {parent_run_id} in experiment {cfg.tracking.experiment}; study in "
          f"{shown_uri(url)}", flush=True)
    try:
        while True:
            with studies.Claim(url) as claim:
                end_dead_runs(client, studies.fail_dead_trials(study))
                studies.retry_failed(study)
                counted, running = studies.counts(study)
                if counted + running >= budget:
                    break
                number = len(study.get_trials(deepcopy=False))  # a new trial's: no other process adds one now
                study.sampler = studies.make_sampler(cfg.seed, cfg.tune.startup_trials, number)
                started: list[int] = []
                study.optimize(functools.partial(objective, claim=claim, cfg=cfg, parent_run_id=parent_run_id,
                                                 started=started), n_trials=1)
            report(study, started[0], budget)
            record_best(client, study, parent_run_id)
    finally:
        with contextlib.suppress(Exception):  # the store may be what failed
            end_parent(client, study, parent_run_id, budget)
    best = record_best(client, study, parent_run_id)
    counted, running = studies.counts(study)
    pruned = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,)))
    others = f", {running} still running in other processes" * bool(running)
    print(f"study {name}: {counted} of {budget} trials ({pruned} pruned{others})")
    if best is None:
        print("no trial finished unpruned yet")
        return None
    print(f"best: trial {best.number}, val_accuracy {best.value:.4f}: {describe(best.params)} "
          f"(run {best.user_attrs.get(studies.RUN_ATTR, '-')})")
    study_arg = f" hparams.study={cfg.tune.study}" * (cfg.tune.study != "default")
    print(f"train it: python train.py model={cfg.model.name} data={cfg.data.name} hparams=tuned{study_arg}", flush=True)
    return float(best.value)


def main(cfg: DictConfig) -> float | None:
    """``python tune.py``: one study (or, with -m model=a,b,..., one per architecture); every interrupt ends in one
    line and its exit code."""
    catch_interrupts()
    started = time.time()
    try:
        best = tune(cfg)
    except BaseException as e:
        if isinstance(e, Interrupted):
            stop(f"interrupted: trial run {e.run_id} marked KILLED (its trial FAIL, not counted); run the same "
                 f"command to go on with the study", e.exit_code)
        signum = interruption(e)
        if signum is not None:
            stop("interrupted; run the same command to go on with the study", 128 + signum)
        raise
    print(f"tuned in {time.time() - started:.0f} s; compare the tuned architectures: docs/tuning.md", flush=True)
    return best


def shared_with_tuning(override: Override) -> bool:
    """Whether a train.py sweep's override holds for its tuning too: its data, optimizer and trainer settings (not
    trainer.epochs: tune.epochs is the trials'), its debug preset and store; not its experiment (tune.yaml's)."""
    key = override.key_or_group
    return not override.is_sweep_override() and (
        key.split(".")[0] in ("optimizer", "trainer", "debug") and key != "trainer.epochs"
        or key.startswith("data.") or key in ("tracking.uri", "tracking.local_dir"))


def tuning_overrides(config: DictConfig, trials: int, epochs: int) -> list[list[str]]:
    """tune.py's overrides for each (dataset, model) that a train.py hparams=tuned sweep trains."""
    overrides = sweep_overrides(config)
    shared = [override.input_line for override in overrides if shared_with_tuning(override)]
    study = [f"tune.study={config.hparams.study}", f"tune.trials={trials}", f"tune.epochs={epochs}"]
    if config.hparams.storage is not None:
        study.append(f"tune.storage={config.hparams.storage}")
    choices = config.hydra.runtime.choices
    return [[f"data={data}", f"model={model}", *shared, *study]
            for data in swept_values(overrides, "data", choices.data)
            for model in swept_values(overrides, "model", choices.model)]


class TuneEachModel(Callback):
    """Before a train.py sweep with hparams=tuned starts its jobs, tune every model (and dataset) it trains with the
    same budget, ``trials`` trials of ``epochs`` epochs each (conf/experiment/fair_comparison.yaml): a study
    that already has its budget is left as it is, a shorter one is tuned on to it (as ``python tune.py``)."""

    def __init__(self, trials: int, epochs: int):
        self.trials, self.epochs = trials, epochs

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:  # its settings were checked first (experiments.config.check_tuning_first)
            for overrides in tuning_overrides(config, self.trials, self.epochs):
                print(f"tuning: python tune.py {' '.join(overrides)}", flush=True)
                main(compose("tune", overrides))
        except Exception as e:
            stop_in_callback(e)
