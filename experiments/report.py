"""The architecture comparison behind ``compare.py``: finished runs from MLflow, one row per model.

Test accuracy and loss are the mean ± the sample standard deviation (ddof=1) over a model's runs
(its seeds); with a single run the deviation is undefined: "—" in the table, empty in the CSV.
Seconds per epoch and images per second are each run's mean over its epochs (training pass only,
as ``EpochLogger`` measures them), then the mean over the model's runs.

One seed counts once: of several finished runs of the same model, dataset and seed (a standalone
run and a sweep's, say), only the latest (by start time) is in the table, the others are named in a
note. With ``register``, each model's best run goes to the Model Registry (``experiments.registry``).

Runs that are not FINISHED are left out and counted by status in a note. Before reading, this host's
runs whose process is gone are marked KILLED (``experiments.lifecycle.mark_dead_runs``); a RUNNING run
of another host, whose process this machine cannot see, counts as "stale" once its latest metric
(its start, before the first) is more than ``stale_after_minutes`` old.
"""

import csv
import socket
import statistics
import time
from collections import Counter
from dataclasses import astuple, dataclass, fields
from datetime import datetime
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from experiments import PROJECT_ROOT, UserError
from experiments.lifecycle import mark_dead_runs
from experiments.registry import CHAMPION, MOVED, SKIPPED, Registration, register_champions
from experiments.tracking import sqlite_path

PARENT_RUN_TAG = "mlflow.parentRunId"
REQUIRED_TAGS = ("model", "layers", "dataset")
REQUIRED_METRICS = ("test_accuracy", "test_loss", "parameter_count", "val_accuracy", "epoch_seconds",
                    "images_per_second")
REQUIRED_PARAMS = ("trainer.epochs", "seed")
LEFT_OUT_ORDER = ("failed", "killed", "stale", "running", "scheduled", "incomplete")
STALE_AFTER_MINUTES = 60  # compare.yaml's default
ARTIFACT_DIR = "comparison"
FILES = ("comparison.md", "comparison.csv", "val_accuracy.png", "accuracy_vs_parameters.png", "throughput.png")


@dataclass(frozen=True)
class RunSummary:
    """One finished training run, reduced to what the comparison needs."""

    run_id: str
    parent_run_id: str | None
    model: str
    layers: str
    dataset: str
    seed: str
    start_time: int  # milliseconds since the epoch
    epochs: int
    parameter_count: int
    test_accuracy: float
    test_loss: float
    epoch_seconds: float  # mean over the run's epochs
    images_per_second: float  # mean over the run's epochs
    val_accuracy: dict[int, float]  # epoch -> validation accuracy
    final_val_accuracy: float  # the last epoch's


@dataclass(frozen=True)
class Selection:
    """The runs a comparison is made of, and how they were chosen."""

    experiment: str
    filter_string: str
    runs: list[RunSummary]  # one per model, dataset and seed
    left_out: Counter  # reason ("failed", "running", ...) -> number of runs
    duplicates: list[RunSummary]  # finished runs dropped for a later one of the same model, dataset and seed


@dataclass(frozen=True)
class ArchitectureRow:
    """One table row. Settings the runs should share are tuples of their distinct values."""

    model: str
    layers: tuple[str, ...]
    dataset: tuple[str, ...]
    runs: int
    test_accuracy_mean: float
    test_accuracy_std: float | None  # None with a single run
    test_loss_mean: float
    test_loss_std: float | None
    parameter_count: tuple[int, ...]
    epochs: tuple[int, ...]
    epoch_seconds: float
    images_per_second: float


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` made: the report's text, where its files are, the run they were logged to."""

    markdown: str
    output_dir: Path
    parent_run_id: str | None  # the sweep parent run, None when logged nowhere
    registrations: list[Registration]  # empty unless registering


# --- Reading the runs -------------------------------------------------------------------------------


def open_store(uri: str) -> MlflowClient:
    """A client for an existing store: a report never creates an empty database as a side effect."""
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UserError(f"tracking.uri {uri!r}: no MLflow database at {db}.")
    return MlflowClient(uri)


def search_filter(sweep_id: str | None, extra_filter: str | None) -> str:
    """The MLflow filter string for the optional sweep id and extra filter, joined with ``and``."""
    parts = []
    if sweep_id is not None:
        parts.append(f"tags.sweep_id = '{sweep_id}'")
    if extra_filter:
        parts.append(extra_filter)
    return " and ".join(parts)


def experiment_id(client: MlflowClient, experiment: str) -> str:
    """The id of the experiment named; an unknown name is the user's mistake."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(f"tracking.experiment {experiment!r}: no such experiment in {client.tracking_uri}.")
    return found.experiment_id


def search_runs(client: MlflowClient, experiment: str, filter_string: str) -> list[Run]:
    """Every active run of the experiment that matches the filter, all result pages."""
    found = experiment_id(client, experiment)
    runs, page_token = [], None
    while True:
        try:
            page = client.search_runs([found], filter_string, max_results=1000, page_token=page_token)
        except MlflowException as e:
            raise UserError(f"invalid search filter {filter_string!r} (from sweep_id/filter): {e.message}") from None
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def is_sweep_parent(run: Run) -> bool:
    return run.data.tags.get("sweep_parent") == "true"


def last_logged(client: MlflowClient, run: Run) -> int:
    """When the run last logged a metric, else when it started (milliseconds since the epoch)."""
    history = (client.get_metric_history(run.info.run_id, key) for key in run.data.metrics)
    return max([run.info.start_time, *(metric.timestamp for metrics in history for metric in metrics)])


def is_stale(client: MlflowClient, run: Run, stale_after_minutes: float) -> bool:
    """Another host's RUNNING run that has logged nothing for ``stale_after_minutes``: its process is
    most likely gone, where this machine cannot look (this host's dead runs are marked KILLED)."""
    if run.info.status != "RUNNING" or run.data.tags.get("host") == socket.gethostname():
        return False
    return time.time() * 1000 - last_logged(client, run) > stale_after_minutes * 60_000


def left_out_reason(client: MlflowClient, run: Run, stale_after_minutes: float) -> str | None:
    """Why a run stays out of the table (its status, "stale", or missing results), None when it is in."""
    if is_stale(client, run, stale_after_minutes):
        return "stale"
    if run.info.status != "FINISHED":
        return run.info.status.lower()
    complete = (all(tag in run.data.tags for tag in REQUIRED_TAGS)
                and all(metric in run.data.metrics for metric in REQUIRED_METRICS)
                and all(param in run.data.params for param in REQUIRED_PARAMS))
    return None if complete else "incomplete"


def metric_by_epoch(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)}


def summarise_run(client: MlflowClient, run: Run) -> RunSummary:
    tags, metrics, run_id = run.data.tags, run.data.metrics, run.info.run_id
    return RunSummary(
        run_id=run_id,
        parent_run_id=tags.get(PARENT_RUN_TAG),
        model=tags["model"],
        layers=tags["layers"],
        dataset=tags["dataset"],
        seed=run.data.params["seed"],
        start_time=run.info.start_time,
        epochs=int(run.data.params["trainer.epochs"]),
        parameter_count=int(metrics["parameter_count"]),
        test_accuracy=metrics["test_accuracy"],
        test_loss=metrics["test_loss"],
        epoch_seconds=statistics.mean(metric_by_epoch(client, run_id, "epoch_seconds").values()),
        images_per_second=statistics.mean(metric_by_epoch(client, run_id, "images_per_second").values()),
        val_accuracy=metric_by_epoch(client, run_id, "val_accuracy"),
        final_val_accuracy=metrics["val_accuracy"],  # MLflow's latest value: the highest step's
    )


def drop_duplicate_seeds(runs: list[RunSummary]) -> tuple[list[RunSummary], list[RunSummary]]:
    """The runs with one per model, dataset and seed (the latest by start time, then by run id), and
    the older ones dropped. Both keep the order of ``runs``."""
    latest: dict[tuple[str, str, str], RunSummary] = {}
    for run in runs:
        key = (run.model, run.dataset, run.seed)
        if key not in latest or (run.start_time, run.run_id) > (latest[key].start_time, latest[key].run_id):
            latest[key] = run
    kept = {run.run_id for run in latest.values()}
    return [run for run in runs if run.run_id in kept], [run for run in runs if run.run_id not in kept]


def load_runs(client: MlflowClient, experiment: str, sweep_id: str | None = None, extra_filter: str | None = None,
              stale_after_minutes: float = STALE_AFTER_MINUTES) -> Selection:
    """The finished training runs that match (sweep parent runs are never among them), and a count
    of the matching runs left out by reason."""
    filter_string = search_filter(sweep_id, extra_filter)
    runs, left_out = [], Counter()
    for run in search_runs(client, experiment, filter_string):
        if is_sweep_parent(run):
            continue
        reason = left_out_reason(client, run, stale_after_minutes)
        if reason:
            left_out[reason] += 1
        else:
            runs.append(summarise_run(client, run))
    kept, duplicates = drop_duplicate_seeds(runs)
    return Selection(experiment, filter_string, kept, left_out, duplicates)


def sweep_parent(client: MlflowClient, runs: list[RunSummary]) -> str | None:
    """The id of the sweep parent run when all the runs are children of the same one, else None."""
    parents = {run.parent_run_id for run in runs}
    if len(parents) != 1 or None in parents:
        return None
    (parent_id,) = parents
    return parent_id if is_sweep_parent(client.get_run(parent_id)) else None


# --- The table --------------------------------------------------------------------------------------


def group_by_model(runs: list[RunSummary]) -> dict[str, list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.model, []).append(run)
    return groups


def sample_std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: list[RunSummary]) -> list[ArchitectureRow]:
    """One row per model, by mean test accuracy, best first."""
    rows = []
    for model, group in group_by_model(runs).items():
        accuracy = [run.test_accuracy for run in group]
        loss = [run.test_loss for run in group]
        rows.append(ArchitectureRow(
            model=model,
            layers=tuple(sorted({run.layers for run in group})),
            dataset=tuple(sorted({run.dataset for run in group})),
            runs=len(group),
            test_accuracy_mean=statistics.mean(accuracy),
            test_accuracy_std=sample_std(accuracy),
            test_loss_mean=statistics.mean(loss),
            test_loss_std=sample_std(loss),
            parameter_count=tuple(sorted({run.parameter_count for run in group})),
            epochs=tuple(sorted({run.epochs for run in group})),
            epoch_seconds=statistics.mean(run.epoch_seconds for run in group),
            images_per_second=statistics.mean(run.images_per_second for run in group),
        ))
    return sorted(rows, key=lambda row: (-row.test_accuracy_mean, row.model))


def mean_std(mean: float, std: float | None, decimals: int, scale: float = 1) -> str:
    return f"{mean * scale:.{decimals}f} ± " + ("—" if std is None else f"{std * scale:.{decimals}f}")


def joined(values: tuple, spec: str = "") -> str:
    return "/".join(format(value, spec) for value in values)


COLUMNS = (  # header, right-aligned, cell
    ("Architecture", False, lambda row: row.model),
    ("Layers", False, lambda row: joined(row.layers)),
    ("Runs", True, lambda row: str(row.runs)),
    ("Test accuracy (%)", True, lambda row: mean_std(row.test_accuracy_mean, row.test_accuracy_std, 2, 100)),
    ("Test loss", True, lambda row: mean_std(row.test_loss_mean, row.test_loss_std, 4)),
    ("Parameters", True, lambda row: joined(row.parameter_count, ",")),
    ("Epochs", True, lambda row: joined(row.epochs)),
    ("s/epoch", True, lambda row: f"{row.epoch_seconds:.2f}"),
    ("Images/s", True, lambda row: f"{row.images_per_second:,.0f}"),
)


def markdown_table(rows: list, columns: tuple) -> str:
    """A Markdown table with padded columns, readable as plain text too."""
    cells = [[header for header, _, _ in columns]] + [[cell(row) for _, _, cell in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    right = [right_aligned for _, right_aligned, _ in columns]

    def line(values):
        padded = (v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right, strict=True)]
    return "\n".join([line(cells[0]), "|" + "|".join(rule) + "|", *(line(values) for values in cells[1:])])


def left_out_counts(left_out: Counter) -> str:
    """E.g. "1 failed, 1 running"; empty when nothing was left out."""
    return ", ".join(f"{left_out[reason]} {reason}" for reason in LEFT_OUT_ORDER if left_out[reason])


def duplicates_note(duplicates: list[RunSummary]) -> str | None:
    """E.g. ``Duplicates dropped: 2 older runs of the same model and seed (lenet seed 0, lenet seed 1).``"""
    if not duplicates:
        return None
    counts = Counter((run.model, run.seed) for run in duplicates)
    in_order = sorted(counts, key=lambda key: (key[0], len(key[1]), key[1]))  # seed 2 before seed 10
    named = [f"{model} seed {seed}" + (f" ×{counts[model, seed]}" if counts[model, seed] > 1 else "")
             for model, seed in in_order]
    runs = "1 older run" if len(duplicates) == 1 else f"{len(duplicates)} older runs"
    return f"Duplicates dropped: {runs} of the same model and seed ({', '.join(named)})."


def mixed_settings_note(rows: list[ArchitectureRow]) -> str | None:
    """Names the models whose runs differ in dataset or epochs: their mean ± std mixes unlike runs."""
    mixed = []
    for row in rows:
        differing = [f"{name} {joined(values)}" for name, values in (("dataset", row.dataset), ("epochs", row.epochs))
                     if len(values) > 1]
        if differing:
            mixed.append(f"{row.model} ({', '.join(differing)})")
    if not mixed:
        return None
    return f"Mixed settings: {'; '.join(mixed)}. Narrow the runs with sweep_id= or filter=."


def registration_status(registration: Registration) -> str:
    """E.g. "new", "moved from version 1", "unchanged"."""
    if registration.status == MOVED:
        return f"moved from version {registration.previous_version}"
    if registration.status == SKIPPED:
        return "skipped: no run with a logged model"
    return registration.status


REGISTERED_COLUMNS = (  # header, right-aligned, cell
    ("Architecture", False, lambda r: r.model),
    ("Registered model", False, lambda r: r.name),
    ("Version", True, lambda r: r.version or "—"),
    ("Alias", False, lambda r: CHAMPION if r.version else "—"),
    ("Run", False, lambda r: r.run_id or "—"),
    ("Dataset", False, lambda r: r.dataset or "—"),
    ("Val accuracy (%)", True, lambda r: "—" if r.val_accuracy is None else f"{100 * r.val_accuracy:.2f}"),
    ("Status", False, registration_status),
)


def registered_section(registrations: list[Registration]) -> str:
    """The Model Registry's champions after registering, and the runs passed over for want of a model."""
    passed_over = [f"{run_id} ({r.model})" for r in registrations for run_id in r.without_model]
    paragraphs = [
        "## Registered",
        markdown_table(registrations, REGISTERED_COLUMNS),
        f"Champion: the run with the best final validation accuracy (never test accuracy), as `models:/<registered "
        f"model>@{CHAMPION}`; a new version only for a run better than the champion.",
        f"Not registered, no logged model: {', '.join(passed_over)}." if passed_over else None,
    ]
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


def to_markdown(selection: Selection, rows: list[ArchitectureRow], registrations: list[Registration]) -> str:
    """The report: heading, which runs, the table, notes on how to read it, and what was registered."""
    chosen = f"runs matching `{selection.filter_string}`" if selection.filter_string else "all runs"
    notes = [
        "Test accuracy and loss: mean ± sample standard deviation over the runs (seeds); — with a single run.",
        "s/epoch and images/s: training pass, mean over epochs, then over runs.",
        f"Left out: {left_out_counts(selection.left_out)}." if selection.left_out else None,
        duplicates_note(selection.duplicates),
        mixed_settings_note(rows),
    ]
    paragraphs = ["# Architecture comparison", f"Experiment `{selection.experiment}`, {chosen}.",
                  markdown_table(rows, COLUMNS), *(note for note in notes if note),
                  registered_section(registrations) if registrations else None]
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph) + "\n"


def csv_value(value) -> str:
    """Raw values at full precision; several distinct values joined by "/"; no std with one run."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return joined(value)
    return repr(value) if isinstance(value, float) else str(value)


def write_csv(rows: list[ArchitectureRow], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(field.name for field in fields(ArchitectureRow))
        writer.writerows([csv_value(value) for value in astuple(row)] for row in rows)


# --- The plots --------------------------------------------------------------------------------------


def val_accuracy_figure(groups: dict[str, list[RunSummary]], models: list[str]):
    """Validation accuracy per epoch: the mean over a model's runs, the band from min to max."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for model in models:
        epochs = sorted({epoch for run in groups[model] for epoch in run.val_accuracy})
        values = [[run.val_accuracy[e] for run in groups[model] if e in run.val_accuracy] for e in epochs]
        line, = ax.plot(epochs, [statistics.mean(v) for v in values], "o-", label=model)
        ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.2)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy (mean, min–max over runs)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def accuracy_vs_parameters_figure(rows: list[ArchitectureRow]):
    """Mean test accuracy against parameter count (log scale), one labelled point per model."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    labels_at = Counter()  # twins share a parameter count: stack their labels instead of overprinting
    for row in rows:
        x = row.parameter_count[0]
        ax.errorbar(x, 100 * row.test_accuracy_mean, yerr=100 * (row.test_accuracy_std or 0), fmt="o", capsize=3)
        ax.annotate(row.model, (x, 100 * row.test_accuracy_mean), textcoords="offset points",
                    xytext=(6, 5 - 12 * labels_at[x]))
        labels_at[x] += 1
    ax.set_xscale("log")
    ax.set(xlabel="parameters", ylabel="test accuracy (%)", title="Test accuracy vs parameter count")
    ax.grid(alpha=0.3, which="both")
    return fig


def throughput_figure(rows: list[ArchitectureRow]):
    """Training images per second per model, in table order from the top."""
    fig = Figure(figsize=(8, 1.5 + 0.5 * len(rows)), layout="constrained")
    ax = fig.subplots()
    models = [row.model for row in rows][::-1]
    ax.barh(models, [row.images_per_second for row in rows][::-1])
    ax.set(xlabel="training images per second", title="Throughput (training pass, mean over epochs and runs)")
    ax.grid(alpha=0.3, axis="x")
    return fig


def save_figure(fig, path: Path) -> None:
    fig.savefig(path, dpi=100)


# --- The report -------------------------------------------------------------------------------------


def default_output_dir(sweep_id: str | None) -> Path:
    return PROJECT_ROOT / "reports" / f"compare-{sweep_id or f'{datetime.now():%Y-%m-%d_%H-%M-%S}'}"


def write_report(output_dir: Path, markdown: str, rows: list[ArchitectureRow], runs: list[RunSummary]) -> list[Path]:
    """comparison.md, comparison.csv and the three plots in output_dir; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / name for name in FILES]
    paths[0].write_text(markdown)
    write_csv(rows, paths[1])
    save_figure(val_accuracy_figure(group_by_model(runs), [row.model for row in rows]), paths[2])
    save_figure(accuracy_vs_parameters_figure(rows), paths[3])
    save_figure(throughput_figure(rows), paths[4])
    return paths


def compare(uri: str, experiment: str, sweep_id: str | None, extra_filter: str | None,
            output_dir: Path | None, register: bool = False,
            stale_after_minutes: float = STALE_AFTER_MINUTES) -> Comparison:
    """Mark this host's dead runs KILLED, read the runs, register each model's best run when
    ``register``, write the report to output_dir (None: reports/compare-<sweep id or time>) and, when
    the runs are one sweep's children, log the files to its parent run under comparison/."""
    if not isinstance(register, bool):
        raise UserError(f"register must be true or false, got {register!r}.")
    number = isinstance(stale_after_minutes, int | float) and not isinstance(stale_after_minutes, bool)
    if not (number and stale_after_minutes > 0):
        raise UserError(f"stale_after_minutes must be a number > 0, got {stale_after_minutes!r}.")
    client = open_store(uri)
    mark_dead_runs(client, [experiment_id(client, experiment)])
    selection = load_runs(client, experiment, sweep_id, extra_filter, stale_after_minutes)
    if not selection.runs:
        where = f"matching {selection.filter_string!r}" if selection.filter_string else "at all"
        left_out = f" (left out: {left_out_counts(selection.left_out)})" if selection.left_out else ""
        raise UserError(f"no finished runs to compare in experiment {experiment!r} {where}{left_out}.")
    rows = summarise(selection.runs)
    # The registry chooses from every complete finished run read, dropped duplicates included: one
    # seed counts once for the table's statistics, but an older run of a seed is still a trained
    # model, and the better one to serve when its validation accuracy is higher.
    registrations = register_champions(client, selection.runs + selection.duplicates) if register else []
    markdown = to_markdown(selection, rows, registrations)
    output_dir = output_dir or default_output_dir(sweep_id)
    paths = write_report(output_dir, markdown, rows, selection.runs)
    parent_run_id = sweep_parent(client, selection.runs)
    if parent_run_id:
        for path in paths:
            client.log_artifact(parent_run_id, str(path), ARTIFACT_DIR)
    return Comparison(markdown, output_dir, parent_run_id, registrations)
