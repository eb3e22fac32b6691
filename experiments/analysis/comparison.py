"""The comparison of architectures: one row per model over its runs, as a Markdown report and a CSV.

Test accuracy and loss are the mean ± the sample standard deviation (ddof=1) over a model's runs
(its seeds); with a single run the deviation is undefined: "—" in the table, empty in the CSV.
Seconds per epoch and images per second are each run's mean over its epochs (training pass only,
as ``EpochLogger`` measures them), then the mean over the model's runs.

The statistics section (``statistics_section``, from ``experiments.analysis.statistics``) follows the table: each
architecture's 95 % bootstrap interval of its mean test accuracy, then one row per pair of architectures (the
difference, its interval, the paired tests' p-values raw and Holm-corrected, a verdict), also written to
pairs.csv, and the critical-difference diagram when there are enough architectures and seeds for one.
"""

import csv
import statistics
from collections import Counter
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from experiments.analysis.plots import (
    accuracy_vs_parameters_figure,
    critical_difference_figure,
    save_figure,
    throughput_figure,
    val_accuracy_figure,
)
from experiments.analysis.statistics import ALPHA, CONFIDENCE, Pair, Statistics, bootstrap_ci, p_text
from experiments.store.registry import CHAMPION, MOVED, SKIPPED, Registration
from experiments.store.runs import LEFT_OUT_ORDER, NOT_TUNED, RunSummary, Selection

FILES = ("comparison.md", "comparison.csv", "val_accuracy.png", "accuracy_vs_parameters.png", "throughput.png",
         "pairs.csv")
CD_DIAGRAM = "critical_difference.png"  # not in FILES: only with 3 or more architectures and 5 or more seeds in common


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
    test_accuracy_ci_low: float | None = None  # 95 % bootstrap interval of the mean; None with a single run
    test_accuracy_ci_high: float | None = None
    tuning: tuple[str, ...] = ()  # how the runs' hyperparameters were chosen: a study's budget, or not tuned


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
        ci = bootstrap_ci(accuracy)
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
            test_accuracy_ci_low=None if ci is None else ci.low,
            test_accuracy_ci_high=None if ci is None else ci.high,
            tuning=tuple(sorted({run.tuning for run in group})),
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
    """Names the models whose runs differ in dataset, epochs or layers: their mean ± std mixes unlike runs. Runs
    differ in layers when ``model.layers=scratch`` turned a model into its scratch twin under the builtin's name."""
    mixed = []
    for row in rows:
        settings = (("dataset", row.dataset), ("epochs", row.epochs), ("layers", row.layers))
        differing = [f"{name} {joined(values)}" for name, values in settings if len(values) > 1]
        if differing:
            mixed.append(f"{row.model} ({', '.join(differing)})")
    if not mixed:
        return None
    twins = " (a scratch twin keeps its own name when trained as model=<name>_scratch)" if any(
        len(row.layers) > 1 for row in rows) else ""
    return f"Mixed settings: {'; '.join(mixed)}. Narrow the runs with sweep_id= or filter={twins}."


def tuning_note(rows: list[ArchitectureRow]) -> str:
    """How each architecture's hyperparameters were chosen, and whether on equal terms: a fair comparison tunes
    every architecture with the same budget (``experiment=fair_comparison``)."""
    budgets = {row.model: joined(row.tuning, "") for row in rows}
    if len(set(budgets.values())) == 1:
        [budget] = set(budgets.values())
        if budget == NOT_TUNED:
            return ("Hyperparameters: not tuned per architecture (the runs' configs), so the ranking also says how "
                    "well those settings suit each; experiment=fair_comparison tunes each with one budget first.")
        return f"Hyperparameters: each architecture at its own study's best setting, {budget} (same budget for all)."
    listed = "; ".join(f"{model} {budget}" for model, budget in budgets.items())
    return f"Hyperparameters chosen unequally: {listed}. The comparison is not on equal terms."


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


# --- The statistics section ------------------------------------------------------------------------------


def percent(value: float | None, decimals: int = 2) -> str:
    return "—" if value is None else f"{100 * value:.{decimals}f}"


def interval(low: float | None, high: float | None) -> str:
    return "—" if low is None or high is None else f"{percent(low)} to {percent(high)}"


def p_cell(p: float | None) -> str:
    return "—" if p is None else p_text(p)


LEVEL = f"{100 * CONFIDENCE:g} %"

INTERVAL_COLUMNS = (  # header, right-aligned, cell: the architectures, in table order
    ("Architecture", False, lambda row: row.model),
    ("Seeds", True, lambda row: str(row.runs)),
    ("Test accuracy (%)", True, lambda row: percent(row.test_accuracy_mean)),
    (f"{LEVEL} CI (%)", True, lambda row: interval(row.test_accuracy_ci_low, row.test_accuracy_ci_high)),
)


def discordant(pair: Pair) -> str:
    """The McNemar table's off-diagonal: test images only A's ensemble gets right / only B's."""
    if pair.mcnemar is None:
        return "—"
    return f"{pair.mcnemar.only_a} / {pair.mcnemar.only_b}"


PAIR_COLUMNS = (  # header, right-aligned, cell
    ("A", False, lambda p: p.model_a),
    ("B", False, lambda p: p.model_b),
    ("Seeds", True, lambda p: str(p.seeds)),
    ("A − B (pp)", True, lambda p: "—" if p.difference is None else f"{100 * p.difference:+.2f}"),
    (f"{LEVEL} CI (pp)", True, lambda p: "—" if p.ci is None else f"{100 * p.ci.low:+.2f} to {100 * p.ci.high:+.2f}"),
    ("p seeds", True, lambda p: p_cell(p.over_seeds and p.over_seeds.pvalue)),
    ("Holm", True, lambda p: p_cell(p.over_seeds_holm)),
    ("Only A / only B", True, discordant),
    ("p McNemar", True, lambda p: p_cell(p.mcnemar and p.mcnemar.pvalue)),
    ("Holm", True, lambda p: p_cell(p.mcnemar_holm)),
    ("Verdict", False, lambda p: p.verdict),
)


def run_names(runs: list[RunSummary]) -> str:
    """E.g. "lenet seed 2, lenet seed 10, simple_conv seed 1"."""
    in_order = sorted(runs, key=lambda run: (run.model, run.dataset, len(run.seed), run.seed))
    return ", ".join(f"{run.model} seed {run.seed}" for run in in_order)


def predictions_notes(stats: Statistics, runs: list[RunSummary]) -> list[str]:
    """Which runs the McNemar test could not use, and why."""
    notes = []
    if not stats.runs_with_predictions and not stats.unreadable:
        notes.append("No run logged test_predictions.npz (older runs): the paired test over predictions (McNemar) "
                     "was skipped; the verdicts rest on the paired test over seeds alone.")
    elif stats.without_predictions:
        older = stats.without_predictions
        notes.append(f"Older runs without test_predictions.npz: {len(older)} ({run_names(older)}), compared without "
                     "the paired test over predictions (McNemar): it uses only the seeds both architectures logged "
                     "predictions for.")
    if stats.unreadable:
        by_id = {run.run_id: run for run in runs}
        named = [f"{by_id[run_id].model} seed {by_id[run_id].seed} ({why})" for run_id, why in stats.unreadable.items()]
        notes.append(f"Unreadable test_predictions.npz, left out of the McNemar test: {'; '.join(named)}.")
    differ = [f"{p.model_a} / {p.model_b}" for p in stats.pairs if p.mcnemar_skipped == "their test sets differ"]
    if differ:
        notes.append(f"No McNemar test where the runs' test sets differ (labels or order): {', '.join(differ)}.")
    return notes


def pair_names(pairs: list[tuple[str, str]]) -> str:
    return ", ".join(f"{a} / {b}" for a, b in pairs)


def seeds_warning(stats: Statistics) -> str | None:
    """Which pairs cannot come out significant for want of seeds, and how many seeds would do."""
    few = stats.too_few_seeds
    if few is None:
        return None
    tested = sum(pair.over_seeds is not None for pair in stats.pairs)
    parts = []
    for floor in few.floors:
        holm = f" ({p_text(floor.floor_holm)} after Holm over {floor.pairs} pairs)" if floor.pairs > 1 else ""
        who = ("no pair can" if len(floor.models) == tested and not few.untested
               else f"{pair_names(floor.models)} cannot")
        parts.append(f"with {floor.seeds} seeds in common the paired test over seeds cannot go below "
                     f"p = {p_text(floor.floor)}{holm}: {who} come out significant")
    if few.untested:
        parts.append(f"{pair_names(few.untested)} share{'s' * (len(few.untested) == 1)} fewer than 2 seeds: "
                     "not tested")
    needed = (f"{few.needed} seeds of each architecture would be needed" if few.needed
              else "more than 64 seeds of each architecture would be needed")
    every = f" with all {few.pairs} pairs tested" if few.pairs > 1 else ""
    return (f"**Too few seeds**: {'; '.join(parts)}. For a pair to reach significance ({100 * ALPHA:g} %) after "
            f"Holm{every}, {needed}.")


def ranking_note(stats: Statistics) -> str:
    if stats.ranking is None:
        return f"No critical-difference diagram: {stats.no_ranking}."
    ranking = stats.ranking
    ranks = ", ".join(f"{model} {rank:.2f}" for model, rank in ranking.mean_ranks.items())
    return (f"Critical-difference diagram ({CD_DIAGRAM}): Friedman test over the {ranking.seeds} seeds every "
            f"architecture ran, p = {p_text(ranking.friedman_p)}; mean ranks (1: best) {ranks}; Nemenyi critical "
            f"difference {ranking.critical_difference:.2f}: architectures closer in mean rank are joined by a bar.")


def statistics_section(rows: list[ArchitectureRow], stats: Statistics, runs: list[RunSummary]) -> str:
    """Intervals per architecture, the pairs' tests and verdicts, and what limits them."""
    paragraphs = [
        "## Statistics",
        f"Test accuracy over seeds, with a {LEVEL} bootstrap confidence interval of the mean (none with one run):",
        markdown_table(rows, INTERVAL_COLUMNS),
    ]
    if stats.pairs:
        paragraphs += [
            f"Pairs of architectures, A − B in test accuracy (percentage points) over the seeds both ran, with its "
            f"{LEVEL} bootstrap interval:",
            markdown_table(stats.pairs, PAIR_COLUMNS),
            "p seeds: exact paired permutation test over the seeds both ran. Only A / only B: the test images only "
            "A's seed ensemble (mean probabilities over those seeds) gets right, and only B's; p McNemar: the exact "
            "McNemar test on them. Holm: each column of p-values corrected over the pairs it tested. A verdict of "
            f"better needs both tests significant ({100 * ALPHA:g} %) after Holm, in the same direction; its p is "
            "the larger of the two. See docs/comparing.md.",
        ]
    else:
        paragraphs.append("No pairs to test: one architecture.")
    paragraphs += [seeds_warning(stats), *predictions_notes(stats, runs), ranking_note(stats)]
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


def to_markdown(selection: Selection, rows: list[ArchitectureRow], registrations: list[Registration],
                stats: Statistics | None = None) -> str:
    """The report: heading, which runs, the table, the statistics section (with ``stats``), notes on how to read
    the table, and what was registered."""
    chosen = f"runs matching `{selection.filter_string}`" if selection.filter_string else "all runs"
    notes = [
        "Test accuracy and loss: mean ± sample standard deviation over the runs (seeds); — with a single run.",
        "s/epoch and images/s: training pass, mean over epochs, then over runs.",
        tuning_note(rows),
        f"Left out: {left_out_counts(selection.left_out)}." if selection.left_out else None,
        duplicates_note(selection.duplicates),
        mixed_settings_note(rows),
    ]
    section = [statistics_section(rows, stats, selection.runs), "## Notes"] if stats else []
    paragraphs = ["# Architecture comparison", f"Experiment `{selection.experiment}`, {chosen}.",
                  markdown_table(rows, COLUMNS), *section, *(note for note in notes if note),
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


PAIR_CSV_COLUMNS = {  # column -> value, at full precision ("" where there is none)
    "model_a": lambda p: p.model_a,
    "model_b": lambda p: p.model_b,
    "seeds": lambda p: p.seeds,
    "difference": lambda p: p.difference,
    "ci_low": lambda p: p.ci and p.ci.low,
    "ci_high": lambda p: p.ci and p.ci.high,
    "p_seeds": lambda p: p.over_seeds and p.over_seeds.pvalue,
    "p_seeds_holm": lambda p: p.over_seeds_holm,
    "mcnemar_seeds": lambda p: p.mcnemar and p.mcnemar.members,
    "only_a": lambda p: p.mcnemar and p.mcnemar.only_a,
    "only_b": lambda p: p.mcnemar and p.mcnemar.only_b,
    "ensemble_accuracy_a": lambda p: p.mcnemar and p.mcnemar.accuracy_a,
    "ensemble_accuracy_b": lambda p: p.mcnemar and p.mcnemar.accuracy_b,
    "p_mcnemar": lambda p: p.mcnemar and p.mcnemar.pvalue,
    "p_mcnemar_holm": lambda p: p.mcnemar_holm,
    "verdict_p": lambda p: p.verdict_p,
    "significant": lambda p: p.significant,
    "verdict": lambda p: p.verdict,
}


def write_pairs_csv(pairs: list[Pair], path: Path) -> None:
    """One row per pair (only a header with one architecture)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PAIR_CSV_COLUMNS)
        writer.writerows([csv_value(value(pair)) for value in PAIR_CSV_COLUMNS.values()] for pair in pairs)


def write_report(output_dir: Path, markdown: str, rows: list[ArchitectureRow], runs: list[RunSummary],
                 stats: Statistics | None = None) -> list[Path]:
    """comparison.md, comparison.csv, the three plots, pairs.csv and (when ``stats`` has a ranking) the
    critical-difference diagram in output_dir; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / name for name in FILES]
    paths[0].write_text(markdown)
    write_csv(rows, paths[1])
    save_figure(val_accuracy_figure(group_by_model(runs), [row.model for row in rows]), paths[2])
    save_figure(accuracy_vs_parameters_figure(rows), paths[3])
    save_figure(throughput_figure(rows), paths[4])
    write_pairs_csv(stats.pairs if stats else [], paths[5])
    if stats and stats.ranking:
        paths.append(output_dir / CD_DIAGRAM)
        save_figure(critical_difference_figure(stats.ranking), paths[-1])
    return paths


