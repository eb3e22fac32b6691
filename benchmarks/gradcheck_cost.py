"""What the gradient check costs a scratch run: CPU-seconds of the check on the first training batch
(experiments.run.scratch_run.gradcheck_first_batch, timed inside the run) against the whole 1-epoch run
(experiments.run.training.train: data, build, check, fit, evaluation, logging), and against its fit
alone; medians of rounds, in one process.

    python benchmarks/gradcheck_cost.py [--rounds 3] [--model lenet_scratch]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlflow  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments import PROJECT_ROOT
from experiments.run import (
    scratch_run,
    training,  # noqa: E402
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="lenet_scratch")
    args = parser.parse_args()
    store = f"sqlite:///{tempfile.mkdtemp(prefix='gradcheck-cost-')}/mlflow.db"
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", [f"model={args.model}", "trainer.epochs=1", f"tracking.uri={store}"])
    check_cpu, run_cpu, fit_cpu = [], [], []
    check = scratch_run.gradcheck_first_batch

    def timed_check(*a):
        started = time.process_time()
        check(*a)
        check_cpu.append(time.process_time() - started)

    training.gradcheck_first_batch = timed_check
    for _ in range(args.rounds):
        started = time.process_time()
        run_id = training.train(cfg).run_id
        run_cpu.append(time.process_time() - started)
        fit_cpu.append(mlflow.MlflowClient(store).get_run(run_id).data.metrics["images_per_cpu_second"])
    check, run = statistics.median(check_cpu), statistics.median(run_cpu)
    images = cfg.data.get("train_size") or 55000
    fit = images / statistics.median(fit_cpu)
    print(f"\n{args.model}, 1 epoch, batch {cfg.trainer.batch_size}, medians of {args.rounds} rounds (CPU-seconds)")
    print(f"gradient check: {check:.2f}   whole run: {run:.2f}   training pass of the epoch: {fit:.2f}")
    print(f"check / run: {100 * check / run:.1f} %  [target < 5 %]   check / training pass: {100 * check / fit:.1f} %")


if __name__ == "__main__":
    main()
