"""Which model a command uses: the one given, a run's, the registered champion, or the best finished run."""

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from experiments.errors import UserError
from experiments.store.registry import champion_uri
from experiments.store.runs import best_run, runs_uri


@dataclass(frozen=True)
class ModelChoice:
    """The model a command uses, and why that one."""

    uri: str
    reason: str


def choose_model(uri: str, experiment: str, model_uri: str | None, run_id: str | None,
                 architecture: str) -> ModelChoice:
    """``model_uri`` as given, else the run's model, else the registered champion of
    ``architecture``, else the best finished run of the experiment (by final val_accuracy)."""
    if model_uri and run_id:
        raise UserError(f"give model_uri or run_id, not both (got model_uri={model_uri!r}, run_id={run_id!r}).")
    if model_uri:
        return ModelChoice(str(model_uri), "given as model_uri")
    client = MlflowClient(uri)
    if run_id:
        return ModelChoice(runs_uri(run_id), f"{run_tag(client, str(run_id), 'model')}, given as run_id")
    champion = champion_uri(client, architecture)
    if champion:
        return ModelChoice(champion, f"{architecture}, registered champion")
    run, count = best_run(client, experiment)
    if run is None:
        raise UserError(f"no finished run with a model in experiment {experiment!r} at {uri}: "
                        "train one with `make train`, or give model_uri= or run_id=.")
    accuracy = run.data.metrics["val_accuracy"]
    return ModelChoice(runs_uri(run.info.run_id),
                       f"{run.data.tags.get('model', '?')}, best val_accuracy {accuracy:.4f} of {count} runs")


def run_tag(client: MlflowClient, run_id: str, tag: str) -> str:
    """A tag of an existing run; an unknown run id is the user's mistake, said in one line."""
    try:
        return client.get_run(run_id).data.tags.get(tag, "?")
    except MlflowException:
        raise UserError(f"run_id {run_id!r}: no such run in {client.tracking_uri}.") from None
