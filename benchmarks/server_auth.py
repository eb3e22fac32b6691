"""What the team server's logins cost: one `train.py debug=tiny` run logged over HTTP to `make server`, with MLflow's
credential cache off (AUTH_CACHE_SECONDS=0: every request checks the password's scrypt hash) and on (the default, 60).

Each round starts the server (experiments/store/server.py over a temporary sqlite store, 2 workers, user alice),
runs one training against it as alice, and reads the CPU time of the server's whole process group from /proc
before stopping it; the two settings alternate, order reversed every other round. Figures are medians over rounds.

    python benchmarks/server_auth.py [--rounds 3]
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fixed_cost import cpu_model  # noqa: E402
from tests.conftest import answers, free_port, group_cpu_seconds, wait_until  # noqa: E402

ADMIN, USER = ("admin", "bench-admin-password"), ("alice", "bench-alice-password")


def one_round(cache_seconds: int, folder: Path) -> tuple[float, float]:
    """(server CPU-s, training wall s) of one training logged through a server with this cache."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1]}
    command = [sys.executable, "-m", "experiments.store.server", "--db", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts", str(folder / "artifacts"), "--auth-dir", str(folder / "auth"), "--port", str(port),
               "--auth-cache-seconds", str(cache_seconds), "--", "--workers", "2"]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_until(lambda: answers(f"{url}/health"), 300, "the team server", server)
        requests.post(f"{url}/api/2.0/mlflow/users/create", auth=ADMIN, json={"username": USER[0], "password": USER[1]},
                      timeout=30).raise_for_status()
        before = group_cpu_seconds(server.pid)
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=tiny", "trainer.plots=true",
                        f"tracking.uri={url}", f"tracking.local_dir={folder / 'local'}",
                        f"hydra.run.dir={folder / 'hydra'}"], cwd=ROOT,
                       env={**os.environ, "MLFLOW_TRACKING_USERNAME": USER[0], "MLFLOW_TRACKING_PASSWORD": USER[1]},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return group_cpu_seconds(server.pid) - before, time.perf_counter() - started
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[int, list[tuple[float, float]]] = {0: [], 60: []}
    for round_ in range(args.rounds):
        for cache_seconds in (0, 60) if round_ % 2 == 0 else (60, 0):
            with tempfile.TemporaryDirectory(prefix="lenet-server-auth-") as folder:
                results[cache_seconds].append(one_round(cache_seconds, Path(folder)))
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; one train.py debug=tiny through make server, medians of "
          f"{args.rounds} rounds\n")
    print("| AUTH_CACHE_SECONDS | server CPU-s | training wall s |")
    print("|---:|---:|---:|")
    for cache_seconds, rows in results.items():
        print(f"| {cache_seconds} | {statistics.median(r[0] for r in rows):.1f} | "
              f"{statistics.median(r[1] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
