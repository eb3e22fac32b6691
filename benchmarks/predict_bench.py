"""predict.py as a user runs it (`make bench` runs this after bench.py): start-up to the first
prediction, and images per second on a folder of 1,000 PNG photos of digits.

A LeNet is trained for one epoch into a temporary store; 1,000 MNIST test digits are written as
photo-like PNGs (enlarged, dark on light, off-centre, uneven background: tests/image_fixtures.py).
Each round runs `python predict.py` as a whole process on one image and on the folder; the
one-image process is the start-up cost, and the folder's images per second are counted over the
difference of the two, per wall second and per CPU second (the child's user + system time).
Figures are medians over rounds.

    python benchmarks/predict_bench.py [--rounds 3] [--images 1000]
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.run.training import train  # noqa: E402
from tests.image_fixtures import write_photo_folder  # noqa: E402


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_predict(images: Path, uri: str, run_id: str, work: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one whole `python predict.py` process."""
    cmd = [sys.executable, str(ROOT / "predict.py"), f"images={images}", f"run_id={run_id}",
           f"tracking.uri={uri}", f"output_dir={work}/out", f"hydra.run.dir={work}/hydra"]
    wall, cpu = time.perf_counter(), children_cpu()
    subprocess.run(cmd, check=True, capture_output=True, cwd=work)
    return time.perf_counter() - wall, children_cpu() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lenet-predict-bench-"))
    uri = f"sqlite:///{work}/mlflow.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["trainer.epochs=1", "data.train_size=10000", f"tracking.uri={uri}"])
    run_id = train(cfg).run_id
    digits = np.load(ROOT / "data" / "mnist.npz")["x_test"][: args.images]
    folder = work / "photos"
    folder.mkdir()
    paths = write_photo_folder(folder, digits, np.random.default_rng(0), formats=("png",))

    startups, rates_wall, rates_cpu = [], [], []
    for _ in range(args.rounds):
        one_wall, one_cpu = timed_predict(paths[0], uri, run_id, work)
        all_wall, all_cpu = timed_predict(folder, uri, run_id, work)
        startups.append((one_wall, one_cpu))
        rates_wall.append((len(paths) - 1) / (all_wall - one_wall))
        rates_cpu.append((len(paths) - 1) / (all_cpu - one_cpu))
    print(f"predict.py, {len(paths)} PNG photos of digits, median of {args.rounds} rounds")
    print("| measure | wall | CPU |\n|---|---:|---:|")
    print(f"| start-up to the first prediction (s) | {statistics.median(s[0] for s in startups):.2f} "
          f"| {statistics.median(s[1] for s in startups):.2f} |")
    print(f"| images per second (beyond start-up) | {statistics.median(rates_wall):,.0f} "
          f"| {statistics.median(rates_cpu):,.0f} |")


if __name__ == "__main__":
    main()
