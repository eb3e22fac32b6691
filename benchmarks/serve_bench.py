"""`make serve` under load (`make bench` runs this last): images per second for 8 concurrent clients sending
batches of 16 tensors or of 16 PNG files, and the latency of one image, per number of uvicorn workers and of
TensorFlow threads in each.

A LeNet is trained with the cheapest preset (debug=tiny: the time per image does not depend on what the model
learnt) into a temporary store, or `--store` and `--run-id` name a run to serve. For each `WORKERSxTHREADS` in
`--servers`, `make serve RUN=<id> STORE=<store> PORT=<free port> WORKERS=<w> THREADS=<t>` is started from a
temporary folder, as a user starts it (THREADS=0: TensorFlow's own choice, a thread per core); every server is up
(each worker has loaded the model) before anything is measured. The requests are
MNIST test digits, prepared once and sent as they are each time:

- tensors: `{"inputs": ...}` of 16 standardised digits, N×28×28×1 as the model's input example has them, and
  N×28×28 (no channel axis: MLflow's JSON parser copies one list fewer per pixel);
- PNG files: `{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}` of 16 28×28 grayscale
  PNGs, prepared in the server as predict.py prepares them;
- one image: one tensor, or one PNG file, sent by one client at a time.

Each round runs every variant on every server in turn for `--seconds`: the clients (threads of this process, one
keep-alive connection each) post their request again as soon as it is answered. Reported per variant: images per
second, the median time per request, and CPU milliseconds per image of the server (every process of `make
serve`'s group, from /proc) and of the clients (this process); medians over rounds.

Then, with the servers stopped, where a server's time goes, in this process (CPU ms, means of 20 calls): each
16-image request through MLflow's own scoring steps, parsing its JSON (`_parse_json_data`), the model's
`predict`, and the answer's JSON (`predictions_to_json`), with Python's garbage collector as in any process and
with what is alive frozen (`gc.freeze`), as experiments/use/serving.py does in a scoring server; and the Keras call
alone on 16 digits: `Model.predict`, a direct call, and the traced tf.function serving.py uses.

    python benchmarks/serve_bench.py [--rounds 3] [--seconds 6] [--servers 2x1 2x0 1x1] [--store URI --run-id ID]
"""

import argparse
import base64
import gc
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from PIL import Image  # noqa: E402

from experiments.run.training import train  # noqa: E402
from experiments.store.logged import METADATA_KEY  # noqa: E402
from experiments.store.runs import runs_uri  # noqa: E402
from experiments.use.serving import ServedModel  # noqa: E402
from tests.conftest import free_port, group_cpu_seconds  # noqa: E402

CLIENTS, BATCH = 8, 16


@dataclass(frozen=True)
class Variant:
    name: str
    body: bytes
    images: int  # per request
    clients: int


@dataclass(frozen=True)
class Server:
    workers: int
    threads: int
    port: int
    process: subprocess.Popen

    @property
    def name(self) -> str:
        return f"{self.workers}x{self.threads}"


def variants(digits: np.ndarray, mean: float, std: float) -> list[Variant]:
    """The requests, from MNIST test digits (N, 28, 28) uint8."""
    x = ((digits / 255 - mean) / std).astype(np.float32)
    files = []
    for digit in digits:
        buffer = io.BytesIO()
        Image.fromarray(digit).save(buffer, "PNG")
        files.append([base64.b64encode(buffer.getvalue()).decode("ascii")])

    def body(payload) -> bytes:
        return json.dumps(payload).encode()

    return [Variant(f"tensors N×28×28×1, {BATCH} per request", body({"inputs": x[:BATCH, ..., None].tolist()}),
                    BATCH, CLIENTS),
            Variant(f"tensors N×28×28, {BATCH} per request", body({"inputs": x[:BATCH].tolist()}), BATCH, CLIENTS),
            Variant(f"PNG files, {BATCH} per request",
                    body({"dataframe_split": {"columns": ["image"], "data": files[:BATCH]}}), BATCH, CLIENTS),
            Variant("one image: a tensor", body({"inputs": x[:1, ..., None].tolist()}), 1, 1),
            Variant("one image: a PNG file", body({"dataframe_split": {"columns": ["image"], "data": files[:1]}}),
                    1, 1)]


def start(workers: int, threads: int, run_id: str, store: str, folder: Path) -> Server:
    port = free_port()
    log = open(folder / f"serve-{workers}x{threads}.log", "w")  # noqa: SIM115  (the server's, for as long as it runs)
    process = subprocess.Popen(["make", "-s", "-f", str(ROOT / "Makefile"), "serve", f"RUN={run_id}", f"STORE={store}",
                                f"PORT={port}", f"WORKERS={workers}", f"THREADS={threads}"],
                               cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(workers, threads, port, process)


def wait_until_up(server: Server, folder: Path, timeout: float = 600) -> None:
    """Every worker has loaded the model (uvicorn logs "Application startup complete" once per worker)."""
    log = folder / f"serve-{server.name}.log"
    deadline = time.monotonic() + timeout
    while log.read_text().count("Application startup complete") < server.workers:
        if server.process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"make serve WORKERS={server.workers} THREADS={server.threads} did not start:\n"
                     f"{log.read_text()[-3000:]}")
        time.sleep(0.5)


def load(server: Server, variant: Variant, seconds: float) -> dict[str, float] | str:
    """``variant.clients`` clients posting ``variant.body`` for ``seconds``: images/s, median ms per request, and
    server and client CPU ms per image; the answer when the server refused the request (a model logged before it
    took image files refuses them and the N×28×28 form)."""
    latencies, refusals, stop = [], [], time.perf_counter() + seconds

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        while time.perf_counter() < stop and not refusals:
            started = time.perf_counter()
            connection.request("POST", "/invocations", variant.body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                refusals.append(f"HTTP {response.status}: {answer[:200].decode(errors='replace')}")
            latencies.append(time.perf_counter() - started)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(variant.clients)]
    wall, cpu, server_cpu = time.perf_counter(), time.process_time(), group_cpu_seconds(server.process.pid)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    if refusals:
        return refusals[0]
    images = len(latencies) * variant.images
    return {"images/s": images / wall, "ms per request": 1000 * statistics.median(latencies),
            "server CPU ms per image": 1000 * (group_cpu_seconds(server.process.pid) - server_cpu) / images,
            "client CPU ms per image": 1000 * (time.process_time() - cpu) / images}


def cpu_ms(call, repeat: int = 20) -> float:
    """Mean CPU milliseconds (this process, all threads) of ``call()`` over ``repeat`` calls, after one more: a
    mean, as the garbage collector's full passes come once every few requests."""
    call()
    started = time.process_time()
    for _ in range(repeat):
        call()
    return 1000 * (time.process_time() - started) / repeat


def where_the_time_goes(run_id: str, requests: list[Variant]) -> None:
    """The in-process tables (the module's docstring says what they measure)."""
    from mlflow.pyfunc.scoring_server import _parse_json_data, predictions_to_json

    model = mlflow.pyfunc.load_model(runs_uri(run_id))
    schema = model.metadata.get_input_schema()
    print("\nIn-process, one request through MLflow's scoring steps, CPU ms")
    print("| request | garbage collector | parse JSON | predict | answer JSON |\n|---|---|---:|---:|---:|")
    for frozen in (False, True):
        gc.freeze() if frozen else gc.unfreeze()
        for variant in [r for r in requests if r.clients > 1]:
            data = _parse_json_data(variant.body, model.metadata, schema).data
            try:
                answer = model.predict(data)
            except MlflowException:  # a model logged before it took image files, or the N×28×28 form
                print(f"| {variant.name} | {'frozen' if frozen else 'as in any process'} | refused | | |")
                continue
            cells = [cpu_ms(lambda v=variant: _parse_json_data(v.body, model.metadata, schema)),
                     cpu_ms(lambda d=data: model.predict(d)),
                     cpu_ms(lambda a=answer: predictions_to_json(a, io.StringIO()))]
            print(f"| {variant.name} | {'frozen' if frozen else 'as in any process'} | "
                  + " | ".join(f"{c:.1f}" for c in cells) + " |")
    gc.unfreeze()

    keras_model = model.get_raw_model()
    x = np.asarray(json.loads(requests[0].body)["inputs"], np.float32)
    served = ServedModel(keras_model, model.metadata.metadata[METADATA_KEY])
    calls = {"Model.predict": lambda: keras_model.predict(x, verbose=0),
             "direct call": lambda: keras_model(x, training=False),
             "traced tf.function (serving.py)": lambda: served.probabilities(x)}
    print(f"\nThe Keras call alone, {len(x)} digits, CPU ms\n| call | CPU ms |\n|---|---:|")
    for name, call in calls.items():
        print(f"| {name} | {cpu_ms(call):.2f} |")


def server_spec(text: str) -> tuple[int, int]:
    """``WORKERSxTHREADS`` -> (workers, threads)."""
    workers, _, threads = text.partition("x")
    if not (workers.isdigit() and int(workers) > 0 and threads.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WORKERSxTHREADS such as 2x1, got {text!r}")
    return int(workers), int(threads)


def trained_run(folder: Path) -> tuple[str, str]:
    store = f"sqlite:///{folder}/mlflow.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["debug=tiny", f"tracking.uri={store}"])
    return store, train(cfg).run_id


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--servers", nargs="+", default=[(2, 1), (2, 0), (1, 1)], type=server_spec,
                        help="WORKERSxTHREADS per server: uvicorn workers, TensorFlow threads in each (0: its choice)")
    parser.add_argument("--store", help="serve a run of this tracking store (with --run-id) instead of training one")
    parser.add_argument("--run-id")
    args = parser.parse_args()
    if (args.store is None) != (args.run_id is None):
        parser.error("give both --store and --run-id, or neither")
    folder = Path(tempfile.mkdtemp(prefix="lenet-serve-bench-"))
    store, run_id = (args.store, args.run_id) if args.store else trained_run(folder)
    mlflow.set_tracking_uri(store)
    data = mlflow.models.get_model_info(runs_uri(run_id)).metadata[METADATA_KEY]
    requests = variants(np.load(ROOT / "data" / "mnist.npz")["x_test"][:BATCH], data["mean"][0], data["std"][0])

    servers = [start(workers, threads, run_id, store, folder) for workers, threads in args.servers]
    try:
        for server in servers:
            wait_until_up(server, folder)
        for server in servers:  # warm-up: first connections, first calls of each path
            for variant in requests:
                load(server, variant, 1)
        results = {}
        for _ in range(args.rounds):
            for variant in requests:
                for server in servers:
                    results.setdefault((variant.name, server.name), []).append(load(server, variant, args.seconds))
    finally:
        for server in servers:
            os.killpg(server.process.pid, 15)
            server.process.wait(timeout=60)

    measures = ("images/s", "ms per request", "server CPU ms per image", "client CPU ms per image")
    print(f"make serve, {CLIENTS} clients for batches, 1 for one image, {args.seconds:g} s per variant and round, "
          f"median of {args.rounds} rounds")
    print("| request | workers x threads | " + " | ".join(measures) + " |")
    print("|---|---:|" + "---:|" * len(measures))
    for (name, spec), rounds in results.items():
        answered = [r for r in rounds if isinstance(r, dict)]
        cells = ([f"{statistics.median(r[m] for r in answered):,.1f}" for m in measures] if answered
                 else ["refused"] + [""] * (len(measures) - 1))
        print(f"| {name} | {spec} | " + " | ".join(cells) + " |")
    for (name, spec), rounds in results.items():
        refused = [r for r in rounds if isinstance(r, str)]
        if refused:
            print(f"{name}, server {spec}: refused: {refused[0]}", file=sys.stderr)
    where_the_time_goes(run_id, requests)


if __name__ == "__main__":
    main()
