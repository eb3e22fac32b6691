"""Accuracy and training cost of the record presets (experiment=strong, experiment=tiny), seed by seed.

Each seed is one whole ``train.py experiment=<preset> seed=<seed>`` process, run one after the other (never two at
once: they would share the CPU); its CPU time is the child's user + system time (all its threads: loading, training,
evaluation, logging), its test accuracy, parameter count and kept epoch are read back from the run. The table ends
with the mean and the sample standard deviation over the seeds. Extra arguments go to train.py (e.g.
``model.layers=scratch``). Runs go to ``--store`` (default: a temporary one), never the project's store.

    python benchmarks/presets.py strong [--seeds 0,1,2] [--store sqlite:////tmp/presets.db] [train.py overrides]

Hours of CPU: not part of ``make bench``.
"""

import argparse
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fixed_cost import cpu_model  # noqa: E402

EXPERIMENT = "presets"  # the tracking experiment the runs go to


def children_cpu() -> float:
    """User + system seconds of this process's finished children so far (all their threads)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train(preset: str, seed: int, store: str, overrides: list[str], folder: str) -> tuple[str, float, float]:
    """One seed's train.py process: its run id (the line ``MLflow run id: <id>``), wall and CPU seconds."""
    command = [sys.executable, str(ROOT / "train.py"), f"experiment={preset}", f"seed={seed}", *overrides,
               f"tracking.uri={store}", f"tracking.experiment={EXPERIMENT}", f"hydra.run.dir={folder}/hydra"]
    started, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    run_id = next(line.split(": ")[1] for line in done.stdout.splitlines() if line.startswith("MLflow run id: "))
    return run_id, time.perf_counter() - started, children_cpu() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset", help="an experiment preset, e.g. strong or tiny")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--store", help="tracking URI (default: a temporary sqlite store)")
    args, overrides = parser.parse_known_args()
    folder = tempfile.mkdtemp(prefix="lenet-presets-")
    store = args.store or f"sqlite:///{folder}/mlflow.db"
    print(f"experiment={args.preset} {' '.join(overrides)}: {cpu_model()}, {os.cpu_count()} CPUs, store {store}\n")
    print("| seed | test accuracy | parameters | kept epoch | CPU-min | wall min | run |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    import mlflow  # here: its import takes seconds

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "Creating initial MLflow database tables"

    client = mlflow.MlflowClient(store)
    accuracies, cpu_minutes = [], []
    for seed in map(int, args.seeds.split(",")):
        run_id, wall, cpu = train(args.preset, seed, store, overrides, folder)
        metrics = client.get_run(run_id).data.metrics
        accuracies.append(100 * metrics["test_accuracy"])
        cpu_minutes.append(cpu / 60)
        kept = int(metrics["kept_epoch"]) if "kept_epoch" in metrics else "last"
        print(f"| {seed} | {accuracies[-1]:.2f} % | {int(metrics['parameter_count']):,} | {kept} | {cpu / 60:.1f} | "
              f"{wall / 60:.1f} | {run_id} |", flush=True)
    if len(accuracies) > 1:
        print(f"\nmean {statistics.mean(accuracies):.3f} % ± {statistics.stdev(accuracies):.3f} (sample sd) over "
              f"{len(accuracies)} seeds; {statistics.mean(cpu_minutes):.1f} CPU-min per seed")


if __name__ == "__main__":
    main()
