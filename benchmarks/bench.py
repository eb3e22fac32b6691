"""Training throughput and peak memory, side by side in one run (`make bench`).

Variants, alternated round by round in this one process:
  plain          the seed notebook's Keras script: LeNet, model.fit on NumPy arrays, batch 128,
                 compile(optimizer="adam", loss="categorical_crossentropy") with Keras's defaults
  lenet          our pipeline, `python train.py model=lenet` (Hydra config, MLflow logging, ...)
  lenet_scratch  the same with our from-scratch layers
Throughput is training images per second of the training pass (validation excluded), per wall
second and per CPU second (all threads; steadier on a shared machine). The first epoch of each run
(graph tracing) is left out; figures are medians over rounds. Memory is measured for each model in
a fresh subprocess training one epoch: the process's peak RSS, and how far RSS grows during fit.

    python benchmarks/bench.py [--rounds 3] [--epochs 3] [--variants plain,lenet,lenet_scratch]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import mlflow  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from benchmarks.plain_keras import TRAIN_IMAGES, seed_recipe  # noqa: E402
from experiments import PROJECT_ROOT  # noqa: E402
from experiments.run.callbacks import EpochTimer  # noqa: E402
from experiments.run.training import train  # noqa: E402

BATCH = 128
STORE = tempfile.mkdtemp(prefix="lenet-bench-")


def compose_cfg(model: str, epochs: int, *extra: str):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("train", [f"model={model}", f"trainer.epochs={epochs}", f"trainer.batch_size={BATCH}",
                                 f"tracking.uri=sqlite:///{STORE}/mlflow.db", "tracking.experiment=bench",
                                 *extra])


def plain_script(epochs: int) -> list[tuple[float, float]]:
    """The seed notebook's recipe (benchmarks/plain_keras.py); returns (images/s, images/CPU-s) per epoch."""
    timer, rates = EpochTimer(), []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: rates.append((TRAIN_IMAGES / timer.seconds,
                                                       TRAIN_IMAGES / timer.cpu_seconds)))
    seed_recipe(epochs, callbacks=[timer, record], verbose=0)
    return rates


def pipeline(model: str, epochs: int) -> list[tuple[float, float]]:
    """Our train() end to end; the rates are the ones it logged to MLflow."""
    run_id = train(compose_cfg(model, epochs)).run_id
    client = mlflow.MlflowClient()
    wall = client.get_metric_history(run_id, "images_per_second")
    cpu = client.get_metric_history(run_id, "images_per_cpu_second")
    return [(w.value, c.value) for w, c in zip(wall, cpu, strict=True)]


def mlflow_log_cost(calls: int = 20) -> float:
    """Seconds one per-epoch mlflow.log_metrics call takes against the sqlite store."""
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("bench").experiment_id):
        start = time.perf_counter()
        for step in range(calls):
            mlflow.log_metrics({f"m{i}": float(i) for i in range(9)}, step=step)
        return (time.perf_counter() - start) / calls


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_memory(model: str) -> None:
    """(In a fresh process) train `model` for one epoch; print the process's peak RSS, and the RSS
    at the start of model.fit and its peak during fit (sampled every 10 ms)."""
    samples, fitting = [], threading.Event()

    def sample():
        while True:
            if fitting.is_set():
                samples.append(rss_mb())
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    fit = keras.Model.fit

    def sampled_fit(self, *args, **kwargs):
        samples.append(rss_mb())
        fitting.set()
        try:
            return fit(self, *args, **kwargs)
        finally:
            fitting.clear()

    keras.Model.fit = sampled_fit
    train(compose_cfg(model, 1))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak": peak, "fit_start": samples[0], "fit_peak": max(samples)}))


def memory_of(model: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--memory-of", model], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    parser.add_argument("--variants", default="plain,lenet,lenet_scratch")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one model's memory, in a subprocess
    args = parser.parse_args()
    if args.memory_of:
        return measure_memory(args.memory_of)
    variants = args.variants.split(",")

    rates = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            run = plain_script if variant == "plain" else lambda e, v=variant: pipeline(v, e)
            measured = run(args.epochs)[1:]
            rates[variant] += measured
            print(f"round {r + 1}: {variant:14s} " + "  ".join(f"{w:,.0f} img/s ({c:,.0f}/CPU-s)"
                                                             for w, c in measured), flush=True)

    median = {v: (statistics.median(w for w, _ in rates[v]), statistics.median(c for _, c in rates[v]))
              for v in variants}
    base = "plain" if "plain" in variants else variants[0]
    print(f"\nMedian of {args.rounds} rounds x {args.epochs - 1} timed epochs, batch {BATCH}, "
          f"{os.cpu_count()} CPUs, keras {keras.__version__}\n")
    print(f"| variant | images/s (wall) | images/CPU-s | ratio to {base} (wall) | ratio (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for v in variants:
        w, c = median[v]
        print(f"| {v} | {w:,.0f} | {c:,.0f} | {w / median[base][0]:.2f} | {c / median[base][1]:.2f} |")
    if {"lenet", "lenet_scratch"} <= set(variants):
        w = median["lenet_scratch"][0] / median["lenet"][0]
        c = median["lenet_scratch"][1] / median["lenet"][1]
        print(f"\nlenet_scratch / lenet: {w:.2f} (wall), {c:.2f} (CPU)  [target >= 0.67]")
    print(f"per-epoch MLflow logging: {mlflow_log_cost() * 1000:.1f} ms per epoch")

    models = [v for v in variants if v != "plain"]
    if models:
        memory = {m: memory_of(m) for m in models}
        base = memory[models[0]]
        print("\n| model | process peak RSS (MB) | ratio | growth during fit (MB) | ratio |")
        print("|---|---:|---:|---:|---:|")
        for m, mem in memory.items():
            growth, base_growth = mem["fit_peak"] - mem["fit_start"], base["fit_peak"] - base["fit_start"]
            print(f"| {m} | {mem['peak']:,.0f} | {mem['peak'] / base['peak']:.2f} | {growth:,.0f} | "
                  f"{growth / base_growth:.2f} |")


if __name__ == "__main__":
    main()
