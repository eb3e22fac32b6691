"""The comparison of architectures: one row per model over its runs, as a Markdown report and a CSV.

Test accuracy and loss are the mean ± the sample standard deviation (ddof=1) over a model's runs
(its seeds); with a single run the deviation is undefined: "—" in the table, empty in the CSV.
Seconds per epoch and images per second are each run's mean over its epochs (training pass only,
as ``EpochLogger`` measures them), then the mean over the model's runs.
"""

import csv
import statistics
from collections import Counter
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from experiments.analysis.plots import (
    accuracy_vs_parameters_figure,
    save_figure,
    throughput_figure,
    val_accuracy_figure,
)
from experiments.store.registry import CHAMPION, MOVED, SKIPPED, Registration
from experiments.store.runs import LEFT_OUT_ORDER, RunSummary, Selection

FILES = ("comparison.md", "comparison.csv", "val_accuracy.png", "accuracy_vs_parameters.png", "throughput.png")


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


