"""The cost of the training images' augmentation per batch (experiments/run/data.py's ``Augmentation``).

Variants, alternated round by round (order reversed every other round), in one process, each a compiled
``tf.function`` of one batch of MNIST-shaped images:
  shifts   whole-pixel shifts alone (data.max_shift=2): padding and two gathers
  affine   shifts, rotations and scaling (the presets': 2, 10 degrees, 0.1): one bilinear resampling
Figures are medians over rounds of the wall and CPU milliseconds (time.process_time, all threads) per batch.

    python benchmarks/augment_cost.py [--rounds 5] [--batches 200] [--batch-size 128]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.fixed_cost import cpu_model  # noqa: E402
from experiments.run.data import Augmentation  # noqa: E402

VARIANTS = {"shifts": Augmentation(max_shift=2), "affine": Augmentation(max_shift=2, max_rotation=10.0, max_scale=0.1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    images = tf.constant(np.random.default_rng(0).normal(size=(args.batch_size, 28, 28, 1)).astype(np.float32))
    steps = {name: tf.function(augmentation) for name, augmentation in VARIANTS.items()}
    for step in steps.values():
        step(images, tf.constant([0, 0], tf.int64))  # traced once, untimed
    times = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            for batch in range(args.batches):
                steps[name](images, tf.constant([r, batch], tf.int64)).numpy()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            times[name].append((wall / args.batches, cpu / args.batches))
    print(f"Median of {args.rounds} rounds of {args.batches} batches of {args.batch_size}, {cpu_model()}, "
          f"{os.cpu_count()} CPUs\n")
    print("| augmentation | CPU-ms per batch | wall ms per batch |")
    print("|---|---:|---:|")
    for name, rounds in times.items():
        print(f"| {name} | {1000 * statistics.median(c for _, c in rounds):.2f} | "
              f"{1000 * statistics.median(w for w, _ in rounds):.2f} |")


if __name__ == "__main__":
    main()
