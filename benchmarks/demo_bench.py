"""The demo page's answer time, per path: a drawing and an uploaded photo (`make bench` runs this after
predict_bench.py).

A LeNet and its scratch twin are trained for one epoch into a temporary store; the page is started as a
user starts it (`python demo.py tracking.uri=<that store>`, its own process, both models loaded) and so is a
Gradio page whose functions do nothing with the same sketchpad and upload (the framework's own cost). The
inputs are MNIST test digits: as the sketchpad sends a drawing (a CANVAS² RGBA PNG, black strokes on a
transparent canvas) and as photos (tests/image_fixtures.py: enlarged, dark ink on uneven paper, PNG and JPEG
in turn), posted through gradio_client as the browser posts them. The variants alternate in each round, on
the same inputs:

- handler: the page's function alone, in this process (reading, preprocessing once, both models, every
  output), per explanation method for an upload;
- page: the whole answer from the demo.py process (upload, queue, both models, every output), per method for
  an upload, with the page's default method for a drawing;
- trivial: the page that does nothing, same input.

Per answer: the median wall milliseconds as the client sees them (p50 over every answer of every round), and
CPU milliseconds of the server process (from /proc: every thread of it) and of the client (this process),
medians over rounds of per-answer means.

    python benchmarks/demo_bench.py [--rounds 5] [--inputs 20]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from experiments.analysis.explain import METHODS  # noqa: E402
from experiments.apps.demo import CANVAS  # noqa: E402
from tests.image_fixtures import write_photo_folder  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_METHOD = OmegaConf.load(ROOT / "conf" / "demo.yaml").method


def drawings(folder: Path, digits: np.ndarray) -> list[Path]:
    """Digits (N, 28, 28) as the sketchpad sends a drawing: black ink on a transparent CANVAS² RGBA PNG."""
    paths = []
    for index, digit in enumerate(digits):
        alpha = Image.fromarray(digit).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
        image = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
        image.putalpha(alpha)
        paths.append(folder / f"{index:03d}.png")
        image.save(paths[-1])
    return paths


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) of process ``pid``; None: this process."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def timed(fn, items, server: int | None) -> tuple[list[float], float, float]:
    """Wall ms of each fn(item), and server CPU ms and client CPU ms per item."""
    walls, server_cpu, client_cpu = [], cpu_seconds(server), time.process_time()
    for item in items:
        start = time.perf_counter()
        fn(item)
        walls.append((time.perf_counter() - start) * 1000)
    n = len(items)
    return walls, (cpu_seconds(server) - server_cpu) * 1000 / n, (time.process_time() - client_cpu) * 1000 / n


def serve_trivial() -> None:
    """A Gradio page whose functions return a string, with the demo's sketchpad and upload (its own process)."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as app:
        sketch = gr.Sketchpad(type="pil", image_mode="RGBA", canvas_size=(CANVAS, CANVAS), fixed_canvas=True,
                              layers=False, transforms=())
        upload = gr.File(type="filepath")
        text = gr.Textbox()
        sketch.change(lambda value: "ok", sketch, text, api_name="draw")
        upload.change(lambda path: "ok", upload, text, api_name="upload")
    port = int(sys.argv[2])
    print(f"trivial page: http://127.0.0.1:{port}", flush=True)
    app.launch(server_name="127.0.0.1", server_port=port, quiet=True)


def start(command: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Start a page process; its URL once it prints one."""
    out = open(log, "w")
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"http://127\.0\.0\.1:\d+", log.read_text())
        if found:
            return proc, found.group(0)
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{' '.join(command)} did not start:\n{log.read_text()[-2000:]}")


def connect(url: str):
    from gradio_client import Client

    deadline = time.monotonic() + 120
    while True:
        try:
            return Client(url + "/", verbose=False, download_files=False)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def train_pair(work: Path) -> tuple[str, list[str]]:
    """A new store in ``work`` and the run ids of a LeNet and a scratch LeNet trained there one epoch on 10,000
    images."""
    from hydra import compose, initialize_config_dir

    from experiments.run.training import train

    uri = f"sqlite:///{work}/mlflow.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return uri, [train(compose("train", ["trainer.epochs=1", "data.train_size=10000", f"model={name}",
                                             f"tracking.uri={uri}"])).run_id for name in ("lenet", "lenet_scratch")]


def measure(uri: str, runs: list[str], work: Path, rounds: int, count: int) -> dict[tuple[str, str], list]:
    """Per (path, variant): each round's ``timed`` figures."""
    import mlflow
    from gradio_client import handle_file

    from experiments.apps.demo import ModelCache, Page, free_port
    from experiments.store.runs import runs_uri

    mlflow.set_tracking_uri(uri)
    uri_a, uri_b = (runs_uri(run) for run in runs)
    cache = ModelCache(DEFAULT_METHOD)
    cache.get(uri_a), cache.get(uri_b)
    page = Page(cache, uri, "lenet-lab")
    digits = np.load(ROOT / "data" / "mnist.npz")["x_test"][:count]
    (work / "photos").mkdir()
    sketches = drawings(work, digits)
    photos = [str(path) for path in write_photo_folder(work / "photos", digits, np.random.default_rng(0))]
    pictures = [Image.open(path) for path in sketches]

    servers = {}
    try:  # every page started is stopped, whatever happens
        servers["page"] = start([sys.executable, str(ROOT / "demo.py"), f"tracking.uri={uri}"], work / "page.log")
        servers["trivial"] = start([sys.executable, __file__, "--serve-trivial", str(free_port())],
                                   work / "trivial.log")
        clients = {name: connect(url) for name, (_, url) in servers.items()}
        pids = {name: proc.pid for name, (proc, _) in servers.items()}

        def sketch(path):
            return {"background": None, "layers": [], "composite": handle_file(str(path))}

        def on_page(method):
            return lambda path: clients["page"].predict(handle_file(path), uri_a, uri_b, method, api_name="/upload")

        def handler(method):
            return lambda path: page.on_upload(path, uri_a, uri_b, method)

        return alternated({
            ("drawing", "handler"): (lambda picture: page.on_sketch({"composite": picture}, uri_a, uri_b,
                                                                    DEFAULT_METHOD), pictures, None),
            ("drawing", "page"): (lambda path: clients["page"].predict(sketch(path), uri_a, uri_b, DEFAULT_METHOD,
                                                                       api_name="/draw"), sketches, pids["page"]),
            ("drawing", "trivial"): (lambda path: clients["trivial"].predict(sketch(path), api_name="/draw"),
                                     sketches, pids["trivial"]),
            **{("upload", f"handler {method}"): (handler(method), photos, None) for method in METHODS},
            **{("upload", f"page {method}"): (on_page(method), photos, pids["page"]) for method in METHODS},
            ("upload", "trivial"): (lambda path: clients["trivial"].predict(handle_file(path), api_name="/upload"),
                                    photos, pids["trivial"]),
        }, rounds)
    finally:
        for proc, _ in servers.values():
            os.killpg(proc.pid, 15)


def alternated(variants: dict, rounds: int) -> dict:
    """Each variant ``(fn, items, server pid)`` timed on its items (``timed``), in turn, ``rounds`` times, after a
    warm-up on three items (first answers, connections, each method traced)."""
    for fn, items, pid in variants.values():
        timed(fn, items[:3], pid)
    results = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (fn, items, pid) in variants.items():
            results[name].append(timed(fn, items, pid))
    return results


LABELS = {"handler": "the page's function alone, in-process", "page": "whole answer from `python demo.py`",
          "trivial": "a Gradio page doing nothing"}


def report(results: dict[tuple[str, str], list], count: int, rounds: int) -> None:
    print(f"demo page, two models (lenet + lenet_scratch), {count} inputs per path, {rounds} rounds; "
          f"drawings with the default method ({DEFAULT_METHOD})")
    print("| path | variant | p50 wall ms | server CPU ms | client CPU ms |\n|---|---|---:|---:|---:|")
    for (path, name), figures in results.items():
        kind, _, method = name.partition(" ")
        p50 = statistics.median(wall for walls, _, _ in figures for wall in walls)
        server, client = (statistics.median(f[i] for f in figures) for i in (1, 2))
        shown = "—" if kind == "handler" else f"{server:.0f}"
        print(f"| {path} | {LABELS[kind]}{f', {method}' if method else ''} | {p50:.0f} | {shown} | {client:.0f} |")


def main():
    if sys.argv[1:2] == ["--serve-trivial"]:
        return serve_trivial()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inputs", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lenet-demo-bench-"))
    report(measure(*train_pair(work), work, args.rounds, args.inputs), args.inputs, args.rounds)


if __name__ == "__main__":
    main()
