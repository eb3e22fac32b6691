"""``python compare.py``: compare architectures over the finished runs in MLflow, one row per model, with the
statistics that say how sure the ranking is (``experiments.analysis.statistics``): intervals over seeds, paired
tests per pair of architectures (over seeds, and McNemar on the runs' logged test-set predictions), Holm-corrected,
a verdict per pair and a critical-difference diagram.

With ``register``, each model's best run goes to the Model Registry (``experiments.store.registry``); when the
runs are one sweep's children, the report is also logged to its parent run under ``comparison/``.
"""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from experiments import PROJECT_ROOT, start_up_done
from experiments.analysis.comparison import left_out_counts, summarise, to_markdown, write_report
from experiments.analysis.statistics import compare_architectures
from experiments.config import check_value
from experiments.errors import NothingFound, stop_in_callback
from experiments.run.sweep import launched_sweep
from experiments.store.registry import Registration, register_champions
from experiments.store.runs import (
    STALE_AFTER_MINUTES,
    experiment_id,
    load_predictions,
    load_runs,
    mark_dead_runs,
    open_store,
    sweep_parent,
)
from experiments.store.tracking import check_store

ARTIFACT_DIR = "comparison"


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` made: the report's text, where its files are, the run they were logged to."""

    markdown: str
    output_dir: Path
    parent_run_id: str | None  # the sweep parent run, None when logged nowhere
    registrations: list[Registration]  # empty unless registering


def default_output_dir(sweep_id: str | None) -> Path:
    return PROJECT_ROOT / "reports" / f"compare-{sweep_id or f'{datetime.now():%Y-%m-%d_%H-%M-%S}'}"


def compare(uri: str, experiment: str, sweep_id: str | None, extra_filter: str | None,
            output_dir: Path | None, register: bool = False,
            stale_after_minutes: float = STALE_AFTER_MINUTES) -> Comparison:
    """Mark this host's dead runs KILLED, read the runs and their test-set predictions, register each model's
    best run when ``register``, write the report to output_dir (None: reports/compare-<sweep id or time>) and,
    when the runs are one sweep's children, log the files to its parent run under comparison/."""
    check_value("register", register)
    check_value("stale_after_minutes", stale_after_minutes)
    client = open_store(uri)
    mark_dead_runs(client, [experiment_id(client, experiment)])
    selection = load_runs(client, experiment, sweep_id, extra_filter, stale_after_minutes)
    if not selection.runs:
        where = f"matching {selection.filter_string!r}" if selection.filter_string else "at all"
        left_out = f" (left out: {left_out_counts(selection.left_out)})" if selection.left_out else ""
        raise NothingFound(f"no finished runs to compare in experiment {experiment!r} {where}{left_out}.")
    rows = summarise(selection.runs)
    predictions, unreadable = load_predictions(client, selection.runs)
    stats = compare_architectures(selection.runs, [row.model for row in rows], predictions, unreadable)
    # The registry chooses from every complete finished run read, dropped duplicates included: one
    # seed counts once for the table's statistics, but an older run of a seed is still a trained
    # model, and the better one to serve when its validation accuracy is higher.
    registrations = register_champions(client, selection.runs + selection.duplicates) if register else []
    markdown = to_markdown(selection, rows, registrations, stats)
    output_dir = output_dir or default_output_dir(sweep_id)
    paths = write_report(output_dir, markdown, rows, selection.runs, stats)
    parent_run_id = sweep_parent(client, selection.runs)
    if parent_run_id:
        for path in paths:
            client.log_artifact(parent_run_id, str(path), ARTIFACT_DIR)
    return Comparison(markdown, output_dir, parent_run_id, registrations)


def main(cfg: DictConfig) -> None:
    """``python compare.py``: the report, printed, written and (for a sweep) logged to the sweep's parent run."""
    uri = check_store(cfg.tracking.uri)
    start_up_done()  # the collector on again without the start-up heap: statsmodels' Holm collects on every call
    comparison = compare(
        uri,
        cfg.tracking.experiment,
        sweep_id=cfg.sweep_id,
        extra_filter=cfg.filter,
        output_dir=None if cfg.output_dir is None else Path(cfg.output_dir),
        register=cfg.register,
        stale_after_minutes=cfg.stale_after_minutes,
    )
    show(comparison)


def show(comparison: Comparison) -> None:
    print(comparison.markdown)
    if comparison.parent_run_id:
        print(f"Logged to sweep parent run {comparison.parent_run_id} under {ARTIFACT_DIR}/")
    print(f"Report written to {comparison.output_dir}")


class ReportAtEnd(Callback):
    """A train.py sweep's comparison report, written once all its jobs have finished (conf/experiment/
    fair_comparison.yaml): what ``python compare.py sweep_id=<the sweep> output_dir=<output_dir>`` writes."""

    def __init__(self, output_dir: str | None = None):
        self.output_dir = None if output_dir is None else Path(output_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        try:
            show(compare(check_store(config.tracking.uri), config.tracking.experiment,
                         launched_sweep(config).sweep_id, extra_filter=None, output_dir=self.output_dir))
        except Exception as e:
            stop_in_callback(e)
