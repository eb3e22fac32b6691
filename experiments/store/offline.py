"""What a run could not send to a tracking server that went away: kept in order, sent when it answers.

Everything a run logs after it started (per-epoch metrics, checkpoints, the test metrics, plots,
tags, the model, its end) goes through an ``Outbox``. A delivery that fails because the server
does not answer is queued, its files copied into the outbox folder, and training goes on; the
queue is retried, in order, at every delivery (so at every epoch end) and once more at the end.
If the server is still away then, the queue stays on disk and

    python -m experiments.store.offline <folder>

sends it later and ends the run, as the process that trained it says.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

QUEUE = "queue.json"


def destination(item: dict) -> tuple[str, str] | None:
    """Where an artifact item lands in the run (folder, file name); None for other items."""
    return (item["artifact_path"], Path(item["file"]).name) if item["kind"] == "artifact" else None


def unreachable(error: BaseException) -> bool:
    """Whether an error means the server did not answer (as opposed to refusing the request)."""
    if isinstance(error, requests.ConnectionError | requests.Timeout):
        return True
    return isinstance(error, MlflowException) and "failed with exception" in error.message


class Outbox:
    """A run's deliveries to its tracking store, queued in order while the server is away."""

    def __init__(self, run_id: str, tracking_uri: str, folder: Path):
        self.run_id, self.tracking_uri, self.folder = run_id, tracking_uri, folder
        self.items: list[dict] = []

    # --- what a run sends ---

    def metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.send({"kind": "metrics", "metrics": metrics, "step": step, "timestamp": int(time.time() * 1000)})

    def artifact(self, path: Path, artifact_path: str) -> None:
        """A file as the run's artifact; the file is copied if it has to wait (it may change meanwhile)."""
        self.send({"kind": "artifact", "file": str(path), "artifact_path": artifact_path})

    def figure(self, fig, name: str) -> None:
        """A matplotlib figure as the artifact ``name`` (e.g. plots/confusion_matrix.png)."""
        path = self.folder / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        self.artifact(path, str(Path(name).parent))

    def tag(self, key: str, value: str) -> None:
        self.send({"kind": "tag", "key": key, "value": value})

    def model(self, model, cfg, examples, probabilities) -> None:
        """The trained model (``experiments.store.logged.log_model``); if the server is away, saved
        here as a .keras file with its config and input examples, and logged from them later."""
        import numpy as np
        from omegaconf import OmegaConf

        from experiments.store.logged import log_model

        if self.flush():
            try:
                return log_model(model, cfg, examples, probabilities)
            except Exception as e:
                if not unreachable(e):
                    raise
        path = self.folder / "files" / "model.keras"
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        (path.parent / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        np.save(path.parent / "examples.npy", examples)
        self.send({"kind": "model", "file": str(path)})

    def end(self, status: str) -> None:
        self.send({"kind": "end", "status": status})

    # --- delivery ---

    def send(self, item: dict) -> None:
        if item["kind"] == "artifact":  # a newer file for the same artifact replaces a queued one
            self.items = [queued for queued in self.items if destination(queued) != destination(item)]
        self.items.append(item)
        self.flush()

    def flush(self) -> bool:
        """Deliver the queue in order; True when it is empty. Stops at the first unanswered delivery."""
        while self.items:
            try:
                deliver(self.run_id, self.items[0])
            except Exception as e:
                if not unreachable(e):
                    raise
                self.keep()
                return False
            self.items.pop(0)
        self.save()
        return True

    def keep(self) -> None:
        """Copy the queued artifact files into the outbox folder and write the queue."""
        files = self.folder / "files"
        for item in self.items:
            source = Path(item.get("file", ""))
            if item["kind"] == "artifact" and files not in source.parents:
                copy = files / "queued" / item["artifact_path"] / source.name
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy)
                item["file"] = str(copy)
        self.save()

    def save(self) -> None:
        if not self.items:
            (self.folder / QUEUE).unlink(missing_ok=True)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "items": self.items}
        (self.folder / QUEUE).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, folder: Path) -> "Outbox":
        state = json.loads((folder / QUEUE).read_text())
        outbox = cls(state["run_id"], state["tracking_uri"], folder)
        outbox.items = state["items"]
        return outbox


def deliver(run_id: str, item: dict) -> None:
    """One queued item to the tracking store."""
    client = MlflowClient()
    kind = item["kind"]
    if kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(key, float(value), item["timestamp"], item["step"])
                                          for key, value in item["metrics"].items()])
    elif kind == "artifact":
        client.log_artifact(run_id, item["file"], item["artifact_path"] or None)
    elif kind == "tag":
        client.set_tag(run_id, item["key"], item["value"])
    elif kind == "model":
        deliver_model(run_id, Path(item["file"]))
    elif kind == "end":
        client.set_terminated(run_id, item["status"])


def deliver_model(run_id: str, path: Path) -> None:
    """Log the model of a run: directly when it is the active run, else from its saved copy."""
    import keras
    import numpy as np
    from omegaconf import OmegaConf

    import models.layers  # noqa: F401  (registers the scratch layers before the model file is read)
    from experiments.store.logged import log_model

    model = keras.saving.load_model(path)
    examples = np.load(path.parent / "examples.npy")
    cfg = OmegaConf.create((path.parent / "config.yaml").read_text())
    active = mlflow.active_run()
    if active and active.info.run_id == run_id:
        log_model(model, cfg, examples, model.predict(examples, verbose=0))
        return
    with mlflow.start_run(run_id=run_id):
        log_model(model, cfg, examples, model.predict(examples, verbose=0))


def main(argv: list[str]) -> int:
    """``python -m experiments.store.offline <folder>``: send a run's pending deliveries."""
    if len(argv) != 1 or not (Path(argv[0]) / QUEUE).is_file():
        print(f"usage: python -m experiments.store.offline <folder with {QUEUE}>", file=sys.stderr)
        return 2
    outbox = Outbox.load(Path(argv[0]))
    mlflow.set_tracking_uri(outbox.tracking_uri)
    count = len(outbox.items)
    if not outbox.flush():
        print(f"error: {outbox.tracking_uri} still does not answer; {len(outbox.items)} deliveries pending in "
              f"{outbox.folder}", file=sys.stderr)
        return 1
    print(f"sent {count} pending deliveries of run {outbox.run_id} to {outbox.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
