"""The MLflow Model Registry: each architecture's best run, as ``lenet-lab-<model>`` with the alias ``champion``.

A model's best run is the one with the best FINAL validation accuracy (its last epoch's
``val_accuracy``), never the best test accuracy: the test set stays out of every choice, so that
its numbers in the report stay an unbiased estimate. Ties go to the later run.

A new version is registered only when a compared run is strictly better than the current champion
as recorded with the champion's version (tag ``val_accuracy``), whether or not the champion's run
is among the compared ones. So registering twice changes nothing, and a filtered comparison never
demotes a better champion. The version is made from the run's logged model (``runs:/<id>/model``,
an MLflow 3 LoggedModel); a run without one is passed over and named in the report.
"""

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from experiments.errors import UserError
from experiments.store.runs import RunSummary

CHAMPION = "champion"
NAME_PREFIX = "lenet-lab-"
LOGGED_MODEL_NAME = "model"  # train.py logs its model as runs:/<run id>/model
VERSION_TAGS = ("model", "layers", "dataset", "seed")  # besides run_id and val_accuracy

NEW, MOVED, UNCHANGED, SKIPPED = "new", "moved", "unchanged", "skipped"


@dataclass(frozen=True)
class Registration:
    """What registering one model's best run did, and the champion it left."""

    model: str
    name: str  # the registered model
    status: str  # NEW (first champion), MOVED (a better run), UNCHANGED or SKIPPED (no run with a logged model)
    version: str | None  # the champion's version afterwards; None when SKIPPED
    run_id: str | None
    val_accuracy: float | None  # the champion's final val_accuracy as recorded with its version
    dataset: str | None
    previous_version: str | None = None  # the former champion, when MOVED
    without_model: tuple[str, ...] = ()  # ids of better-ranked runs passed over: no logged model


def registered_model_name(model: str) -> str:
    """``lenet-lab-<model>``: the registered model of one architecture (the runs' ``model`` tag)."""
    return f"{NAME_PREFIX}{model}"


def has_error_code(error: MlflowException, code: int) -> bool:
    """Whether MLflow raised ``error`` with this code (e.g. ``RESOURCE_DOES_NOT_EXIST``), locally or from a server."""
    return error.error_code == ErrorCode.Name(code)


def champion_version(client: MlflowClient, model: str) -> ModelVersion | None:
    """The version the ``champion`` alias points at; None when the registered model or the alias
    does not exist."""
    name = registered_model_name(model)
    try:
        version = client.get_registered_model(name).aliases.get(CHAMPION)
    except MlflowException as e:
        if has_error_code(e, RESOURCE_DOES_NOT_EXIST):
            return None
        raise
    return None if version is None else client.get_model_version(name, str(version))


def champion_uri(client: MlflowClient, model: str) -> str | None:
    """``models:/lenet-lab-<model>@champion`` when that alias exists, else None."""
    if champion_version(client, model) is None:
        return None
    return f"models:/{registered_model_name(model)}@{CHAMPION}"


def recorded_val_accuracy(client: MlflowClient, version: ModelVersion) -> float | None:
    """The champion's final val_accuracy: its version tag, else (a version registered by hand) its
    run's metric; None when neither exists."""
    if "val_accuracy" in version.tags:
        return float(version.tags["val_accuracy"])
    try:
        return client.get_run(version.run_id).data.metrics.get("val_accuracy") if version.run_id else None
    except MlflowException:
        return None


def logged_model(client: MlflowClient, run_id: str) -> LoggedModel | None:
    """The run's complete logged model named ``model``; None when it logged none (or failed to)."""
    outputs = client.get_run(run_id).outputs
    for output in outputs.model_outputs if outputs else []:
        found = client.get_logged_model(output.model_id)
        if found.name == LOGGED_MODEL_NAME and found.status == LoggedModelStatus.READY:
            return found
    return None


def ranked(runs: list[RunSummary]) -> list[RunSummary]:
    """Best final val_accuracy first; ties to the later run (then the run id, for a fixed order)."""
    return sorted(runs, key=lambda run: (run.final_val_accuracy, run.start_time, run.run_id), reverse=True)


def create_registered_model(client: MlflowClient, name: str, model: str) -> None:
    """Create the registered model unless it exists (another process may have just made it)."""
    try:
        client.create_registered_model(
            name, tags={"model": model},
            description=f"LeNet Lab: the {model} run with the best final validation accuracy, alias '{CHAMPION}'.")
    except MlflowException as e:
        if not has_error_code(e, RESOURCE_ALREADY_EXISTS):
            raise


def register_version(client: MlflowClient, name: str, run: RunSummary, model: LoggedModel) -> str:
    """A new version from the run's logged model, the ``champion`` alias moved to it; returns its number.

    The source is the logged model's artifact location, not ``models:/<model id>``: MLflow's sqlite
    registry resolves the latter through the global tracking URI, not this client's.
    """
    create_registered_model(client, name, run.model)
    tags = {"run_id": run.run_id, "val_accuracy": repr(run.final_val_accuracy)}
    tags |= {key: str(getattr(run, key)) for key in VERSION_TAGS}
    version = client.create_model_version(
        name, source=model.artifact_location, run_id=run.run_id, model_id=model.model_id, tags=tags,
        description=f"{run.model} on {run.dataset}, seed {run.seed}: final val_accuracy {run.final_val_accuracy:.4f}")
    client.set_registered_model_alias(name, CHAMPION, str(version.version))
    return str(version.version)


def register_champion(client: MlflowClient, model: str, runs: list[RunSummary]) -> Registration:
    """Register the best of one model's runs unless the champion is as good; see the module doc."""
    name = registered_model_name(model)
    champion = champion_version(client, model)
    bar = None if champion is None else recorded_val_accuracy(client, champion)
    without_model = []
    for run in ranked(runs):
        if champion and (run.run_id == champion.run_id or (bar is not None and run.final_val_accuracy <= bar)):
            break
        found = logged_model(client, run.run_id)
        if found is None:
            without_model.append(run.run_id)
            continue
        version = register_version(client, name, run, found)
        return Registration(model, name, MOVED if champion else NEW, version, run.run_id, run.final_val_accuracy,
                            run.dataset, None if champion is None else str(champion.version), tuple(without_model))
    if champion is None:
        return Registration(model, name, SKIPPED, None, None, None, None, without_model=tuple(without_model))
    return Registration(model, name, UNCHANGED, str(champion.version), champion.run_id, bar,
                        champion.tags.get("dataset"), without_model=tuple(without_model))


def register_champions(client: MlflowClient, runs: list[RunSummary]) -> list[Registration]:
    """For each model among the runs (by name), register its best run as the champion when it beats
    the current one. Registry failures (e.g. a server refusing) are one-line ``UserError``s."""
    by_model: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_model.setdefault(run.model, []).append(run)
    registrations = []
    for model in sorted(by_model):
        try:
            registrations.append(register_champion(client, model, by_model[model]))
        except MlflowException as e:
            raise UserError(f"registering {registered_model_name(model)} failed: {e.message.splitlines()[0]}") from None
    return registrations
