"""Sweeps in MLflow: every `python train.py -m ...` gets one parent run, and each of its jobs is a
child run tagged with the sweep id, so the MLflow UI shows the sweep grouped.

The Hydra callback (``experiments.run.sweep_callback``, calling ``start_sweep``) creates the store, the
experiment and the parent run once in the launching process, before any job starts (parallel jobs would race
creating them), and puts the sweep's id and the parent's run id into the config every job is composed from:
Hydra's launchers (basic, joblib, submitit) compose each job's config anew from the sweep's
``hydra.overrides.hydra`` plus the job's own overrides (``ConfigLoader.load_sweep_config``), so the callback appends
``++hydra.job.env_set.LENET_LAB_SWEEP_ID=...`` and ``...PARENT_RUN_ID=...`` there. A job reads them
from its own config (``job_sweep``; Hydra also sets them in the job's environment), so a job on
another machine of a cluster needs nothing of the submitting machine's files: only the tracking URI.

A sweep that stopped part-way (a job failed or was killed, the machine went down) is resumed with
the same command and ``sweep_resume=<sweep id>`` (or its parent run's id): the same parent run goes
back to RUNNING, and each job looks up its earlier child run in the tracking store by the run's
``sweep_job`` tag (the job's overrides, ``job_identity``), never in files of the machine that
submitted the sweep. The job then

- is skipped, its result reported, when that run is FINISHED;
- continues that run from its checkpoint (``train.py resume=``'s path, the run's logged config)
  when it is KILLED, FAILED or was left RUNNING by a process that died;
- trains in a new run when that run stopped before its first checkpoint: the old run, with no
  finished epoch to keep, is deleted (MLflow's soft delete: ``mlflow runs restore`` brings it
  back), so the sweep keeps one child per job;
- trains in a new run when it has no earlier run (a job the first attempt never reached).
"""

import atexit
import contextlib
import uuid
from dataclasses import dataclass
from datetime import datetime

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from experiments import start_up_done
from experiments.errors import UserError, one_line, stop
from experiments.run.lifecycle import FREE_KEYS
from experiments.store.runs import mark_dead_runs
from experiments.store.tracking import setup_experiment

SWEEP_ID_VAR, PARENT_RUN_VAR = "LENET_LAB_SWEEP_ID", "LENET_LAB_SWEEP_PARENT_RUN_ID"  # in hydra.job.env_set
JOB_TAG = "sweep_job"
NOT_IDENTITY = (*FREE_KEYS, "sweep_resume")  # where a job's run is stored and how it was started
PARENT_RUN_TAG = "mlflow.parentRunId"


@dataclass(frozen=True)
class Sweep:
    sweep_id: str
    parent_run_id: str


def pass_to_jobs(config: DictConfig, sweep: Sweep) -> None:
    """Put the sweep's ids into the overrides that every job's config is composed from (``job_sweep``)."""
    config.hydra.overrides.hydra.extend([f"++hydra.job.env_set.{SWEEP_ID_VAR}={sweep.sweep_id}",
                                         f"++hydra.job.env_set.{PARENT_RUN_VAR}={sweep.parent_run_id}"])


def job_sweep() -> Sweep:
    """The sweep of the running job, from the job's own config (``pass_to_jobs``)."""
    env = HydraConfig.get().job.env_set
    return Sweep(env[SWEEP_ID_VAR], env[PARENT_RUN_VAR])


def launched_sweep(config: DictConfig) -> Sweep:
    """The sweep this process launches, in a callback after ``SweepCallback`` (from ``pass_to_jobs``)."""
    env = {}
    for override in config.hydra.overrides.hydra:
        key, _, value = override.lstrip("+").partition("=")
        env[key.removeprefix("hydra.job.env_set.")] = value
    return Sweep(env[SWEEP_ID_VAR], env[PARENT_RUN_VAR])


def sweep_overrides(config: DictConfig) -> list[Override]:
    """The sweep's overrides as Hydra's sweeper reads them: ``hydra.sweeper.params``, then the command line's."""
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    return OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))


def swept_values(overrides: list[Override], key: str, default: str) -> list[str]:
    """The values ``key`` takes in the sweep's jobs (the last override of it wins, as in the sweeper)."""
    found = [override for override in overrides if override.key_or_group == key]
    if not found:
        return [default]
    if found[-1].is_sweep_override():
        return list(found[-1].sweep_string_iterator())
    return [found[-1].get_value_element_as_str()]


# --- The parent run ---------------------------------------------------------------------------------


def new_sweep(client: MlflowClient, experiment_id: str, overrides: list[str]) -> Sweep:
    """A new sweep id and its parent run, RUNNING until the sweep ends."""
    sweep_id = f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    parent = client.create_run(
        experiment_id,
        run_name=f"sweep-{sweep_id}",
        tags={"sweep_id": sweep_id, "sweep_parent": "true", "sweep_overrides": " ".join(overrides)},
    )
    return Sweep(sweep_id, parent.info.run_id)


def find_parent(client: MlflowClient, experiment_id: str, ref: str) -> Run | None:
    """The parent run of the sweep that ``ref`` names, by sweep id or by the parent's run id; None if
    the experiment has no such sweep."""
    with contextlib.suppress(MlflowException):  # a malformed id matches nothing
        found = client.search_runs([experiment_id], f"tags.sweep_parent = 'true' and tags.sweep_id = '{ref}'")
        if found:
            return found[0]
    with contextlib.suppress(MlflowException):
        run = client.get_run(ref)
        if run.data.tags.get("sweep_parent") == "true" and run.info.experiment_id == experiment_id:
            return run
    return None


def children(client: MlflowClient, parent: Run) -> list[Run]:
    """The parent's child runs (the sweep's jobs so far), deleted ones not among them."""
    return client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_RUN_TAG}` = '{parent.info.run_id}'",
                              max_results=50000)


def resume_sweep(client: MlflowClient, experiment_id: str, ref: str) -> Sweep:
    """The sweep ``ref`` names, its parent run RUNNING again; refused (UserError) when the sweep is
    unknown or one of its runs still runs (this host's runs of dead processes are marked KILLED first)."""
    parent = find_parent(client, experiment_id, ref)
    if parent is None:
        raise UserError(f"sweep_resume={ref}: no sweep with that id (or parent run id) in experiment "
                        f"{client.get_experiment(experiment_id).name!r} at {client.tracking_uri}.")
    mark_dead_runs(client, [experiment_id])
    running = [run for run in children(client, parent) if run.info.status == "RUNNING"]
    if running:
        tags = running[0].data.tags
        raise UserError(f"sweep_resume={ref}: its run {running[0].info.run_id} is still RUNNING (process "
                        f"{tags.get('pid', '?')} on {tags.get('host', '?')}); resume the sweep once it has stopped.")
    client.update_run(parent.info.run_id, status="RUNNING")
    return Sweep(parent.data.tags["sweep_id"], parent.info.run_id)


def start_sweep(config: DictConfig) -> Sweep:
    """Start the sweep's parent run, or with ``sweep_resume=`` take the earlier one up again, and pass its ids to
    the jobs' configs; a sweep that cannot be resumed stops here with one line and exit code 2, before any job
    runs, as does one whose tracking store does not answer (exit 1 for a database: ``DatabaseAway``). Hydra would
    turn the error into a warning and run the jobs without their sweep."""
    start_up_done()  # this process now submits and waits for jobs (or runs them itself): its collector on again
    try:
        experiment_id = setup_experiment(config.tracking.uri, config.tracking.experiment)
        client = mlflow.MlflowClient()
        if config.get("sweep_resume"):
            sweep = resume_sweep(client, experiment_id, str(config.sweep_resume))
        else:
            sweep = new_sweep(client, experiment_id, list(config.hydra.overrides.task))
    except UserError as e:
        stop(*one_line(e))
    pass_to_jobs(config, sweep)
    atexit.register(end_unfinished, client.tracking_uri, sweep)
    resumed = "resuming " * bool(config.get("sweep_resume"))
    print(f"MLflow sweep {sweep.sweep_id}: {resumed}parent run {sweep.parent_run_id}")
    return sweep


def end_sweep(sweep: Sweep) -> None:
    """All jobs done: the parent run ends FINISHED, unless a job already ended it FAILED or KILLED."""
    client = mlflow.MlflowClient()
    if client.get_run(sweep.parent_run_id).info.status == "RUNNING":
        client.set_terminated(sweep.parent_run_id, "FINISHED")


def end_unfinished(uri: str, sweep: Sweep) -> None:
    """At the submitting process's exit: a parent run still RUNNING means the sweep stopped before its end
    without a job saying why (e.g. Hydra could not compose a job's config: ``-m seed=abc,1``): FAILED."""
    client = MlflowClient(uri)
    with contextlib.suppress(MlflowException):  # a store gone by then: the run stays as it is
        if client.get_run(sweep.parent_run_id).info.status == "RUNNING":
            client.set_terminated(sweep.parent_run_id, "FAILED")


def end_sweep_early(sweep: Sweep, status: str) -> None:
    """A job of the sweep failed (FAILED) or was interrupted (KILLED): the parent run says so, since
    Hydra stops the sweep without calling ``on_multirun_end``."""
    mlflow.MlflowClient().set_terminated(sweep.parent_run_id, status)


# --- The jobs ---------------------------------------------------------------------------------------


def job_identity(overrides: list[str]) -> str:
    """What a sweep job trains: its overrides, sorted and space-joined, without those that say where its
    run is stored (``tracking.*``) or how it was started (``resume=``, ``sweep_resume=``)."""
    return " ".join(sorted(o for o in overrides if not o.lstrip("+~").startswith(NOT_IDENTITY)))


def has_checkpoint(client: MlflowClient, run: Run, tracking: DictConfig) -> bool:
    """Whether the run saved a checkpoint: on this machine, or logged to the tracking store."""
    from experiments.run.checkpoints import ARTIFACT_DIR, FILE, Checkpoints, checkpoint_dir  # Keras: jobs only

    run_id = run.info.run_id
    if Checkpoints(checkpoint_dir(tracking, run_id)).path.is_file():
        return True
    return any(artifact.path == f"{ARTIFACT_DIR}/{FILE}" for artifact in client.list_artifacts(run_id, ARTIFACT_DIR))


def earlier_run(client: MlflowClient, sweep: Sweep, overrides: list[str], tracking: DictConfig) -> Run | None:
    """The job's child run from before the sweep was resumed, when there is one worth keeping: FINISHED
    (to report) or stopped after a checkpoint (to continue). A run that stopped before its first
    checkpoint is deleted for a new run to replace it; None then, as for a job without earlier run."""
    identity = job_identity(overrides)
    parent = client.get_run(sweep.parent_run_id)
    runs = [run for run in children(client, parent) if run.data.tags.get(JOB_TAG) == identity]
    if not runs:
        return None
    run = max(runs, key=lambda r: (r.info.status == "FINISHED", r.info.start_time))  # a job twice in the sweep
    if run.info.status == "FINISHED" or has_checkpoint(client, run, tracking):
        return run
    print(f"run {run.info.run_id} ({identity}) stopped before its first checkpoint: deleted, the job trains "
          "in a new run", flush=True)
    client.delete_run(run.info.run_id)
    return None
