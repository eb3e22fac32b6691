"""The fixed cost of a run, measured on whole processes as a user starts them (`make bench`).

Variants, alternated round by round (order reversed every other round), each a fresh process:
  bare   python -c "import tensorflow, keras"          the floor any Keras program pays
  tiny   python train.py trainer.epochs=1 data.train_size=256 data.val_size=256 data.test_size=256
  plain  python benchmarks/plain_keras.py --epochs 3    the seed notebook's plain Keras script
  ours   python train.py trainer.epochs=3               the same 3 epochs with everything logged
CPU-seconds are the child's user + system time (all its threads); wall is wall. Figures are
medians over rounds. Targets: tiny - bare <= 10 CPU-s; ours / plain <= 1.0 CPU-s (goal 0.9).
Runs go to a temporary store, never the project's.

    python benchmarks/fixed_cost.py [--rounds 3] [--variants bare,tiny,plain,ours]
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commands(store: str) -> dict[str, list[str]]:
    train = [sys.executable, str(ROOT / "train.py"), f"tracking.uri=sqlite:///{store}/mlflow.db",
             f"hydra.run.dir={store}/hydra"]
    return {"bare": [sys.executable, "-c", "import tensorflow, keras"],
            "tiny": train + ["debug=tiny", "trainer.plots=true"],  # every step of a run
            "plain": [sys.executable, str(ROOT / "benchmarks" / "plain_keras.py"), "--epochs", "3"],
            "ours": train + ["trainer.epochs=3"]}


def measure(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one whole process (it must succeed)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"{' '.join(command)} failed ({code}):\n{stderr.decode()[-2000:]}")
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="bare,tiny,plain,ours")
    args = parser.parse_args()
    variants = args.variants.split(",")
    store = tempfile.mkdtemp(prefix="lenet-fixed-cost-")
    runs = commands(store)
    subprocess.run(runs["tiny"], cwd=ROOT, check=True, capture_output=True)  # creates the store once, untimed

    times = {v: [] for v in variants}
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            wall, cpu = measure(runs[variant])
            times[variant].append((wall, cpu))
            print(f"round {r + 1}: {variant:5s} {cpu:6.1f} CPU-s {wall:6.1f} s", flush=True)

    median = {v: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for v, t in times.items()}
    print(f"\nMedian of {args.rounds} rounds, {cpu_model()}, {os.cpu_count()} CPUs\n")
    print("| process | CPU-s | wall s |")
    print("|---|---:|---:|")
    for v in variants:
        print(f"| {v} | {median[v][1]:.1f} | {median[v][0]:.1f} |")
    if {"bare", "tiny"} <= set(variants):
        print(f"\ntiny run beyond `import tensorflow, keras`: {median['tiny'][1] - median['bare'][1]:.1f} CPU-s "
              f"({median['tiny'][0] - median['bare'][0]:.1f} s wall)  [target <= 10 CPU-s]")
    if {"plain", "ours"} <= set(variants):
        print(f"3 epochs, ours / plain script: {median['ours'][1] / median['plain'][1]:.2f} (CPU), "
              f"{median['ours'][0] / median['plain'][0]:.2f} (wall)  [target <= 1.0, goal 0.9]")


if __name__ == "__main__":
    main()
