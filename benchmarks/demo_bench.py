"""The demo page's answer time per drawing (`make bench` runs this after predict_bench.py).

A LeNet and its scratch twin are trained for one epoch into a temporary store; the page is started as a
user starts it (`python demo.py tracking.uri=<that store>`, its own process, both models loaded) and so is a
Gradio page whose function does nothing with the same sketchpad (the framework's own cost). A drawing is
what the sketchpad sends: a CANVAS² RGBA PNG, black strokes on a transparent canvas (here MNIST test
digits, enlarged), posted through gradio_client as the browser posts it. Three variants alternate in each
round, on the same drawings:

- handler: the page's function alone, in this process (preprocessing once, both models, every output);
- page: the whole answer from the demo.py process (upload, queue, both models, every output);
- trivial: the page that does nothing, same drawing.

Per answer: wall milliseconds as the client sees them, and CPU milliseconds of the server process (from
/proc: every thread of it) and of the client (this process); medians over rounds of per-answer means.

    python benchmarks/demo_bench.py [--rounds 5] [--drawings 20]
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
from PIL import Image  # noqa: E402

from experiments.apps.demo import CANVAS  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def drawings(folder: Path, count: int) -> list[Path]:
    """MNIST test digits as the sketchpad sends a drawing: black ink on a transparent CANVAS² RGBA PNG."""
    paths = []
    for index, digit in enumerate(np.load(ROOT / "data" / "mnist.npz")["x_test"][:count]):
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


def timed(fn, items, server: int | None) -> tuple[float, float, float]:
    """Wall ms, server CPU ms and client CPU ms per item of fn(item)."""
    wall, server_cpu, client_cpu = time.perf_counter(), cpu_seconds(server), time.process_time()
    for item in items:
        fn(item)
    n = len(items)
    return ((time.perf_counter() - wall) * 1000 / n, (cpu_seconds(server) - server_cpu) * 1000 / n,
            (time.process_time() - client_cpu) * 1000 / n)


def serve_trivial() -> None:
    """A Gradio page whose function returns a string, with the demo's sketchpad (run in its own process)."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as app:
        sketch = gr.Sketchpad(type="pil", image_mode="RGBA", canvas_size=(CANVAS, CANVAS), fixed_canvas=True,
                              layers=False, transforms=())
        text = gr.Textbox()
        sketch.change(lambda value: "ok", sketch, text, api_name="draw")
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


def main():
    if sys.argv[1:2] == ["--serve-trivial"]:
        return serve_trivial()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drawings", type=int, default=20)
    args = parser.parse_args()
    import mlflow
    from gradio_client import handle_file
    from hydra import compose, initialize_config_dir

    from experiments.apps.demo import ModelCache, Page, free_port
    from experiments.run.training import train
    from experiments.store.logged import runs_uri

    work = Path(tempfile.mkdtemp(prefix="lenet-demo-bench-"))
    uri = f"sqlite:///{work}/mlflow.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        runs = [train(compose("train", ["trainer.epochs=1", "data.train_size=10000", f"model={name}",
                                        f"tracking.uri={uri}"])).run_id for name in ("lenet", "lenet_scratch")]
    mlflow.set_tracking_uri(uri)
    uri_a, uri_b = (runs_uri(run) for run in runs)
    cache = ModelCache()
    cache.get(uri_a), cache.get(uri_b)
    page = Page(cache, uri, "lenet-lab")
    paths = drawings(work, args.drawings)
    pictures = [Image.open(path) for path in paths]

    servers = {"page": start([sys.executable, str(ROOT / "demo.py"), f"tracking.uri={uri}"], work / "page.log"),
               "trivial": start([sys.executable, __file__, "--serve-trivial", str(free_port())], work / "trivial.log")}
    clients = {name: connect(url) for name, (_, url) in servers.items()}
    try:
        def sketch(path):
            return {"background": None, "layers": [], "composite": handle_file(str(path))}

        variants = {
            "handler": (lambda picture: page.on_sketch({"composite": picture}, uri_a, uri_b), pictures, None),
            "page": (lambda path: clients["page"].predict(sketch(path), uri_a, uri_b, api_name="/draw"), paths,
                     servers["page"][0].pid),
            "trivial": (lambda path: clients["trivial"].predict(sketch(path), api_name="/draw"), paths,
                        servers["trivial"][0].pid),
        }
        for fn, items, pid in variants.values():  # warm-up: first answers, connections
            timed(fn, items[:3], pid)
        results = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (fn, items, pid) in variants.items():
                results[name].append(timed(fn, items, pid))
    finally:
        for proc, _ in servers.values():
            os.killpg(proc.pid, 15)

    print(f"demo page, two models (lenet + lenet_scratch), {len(paths)} drawings of {CANVAS}x{CANVAS} px, "
          f"median of {args.rounds} rounds")
    print("| variant | wall ms per answer | server CPU ms | client CPU ms |\n|---|---:|---:|---:|")
    labels = {"handler": "the page's function alone (in-process)", "page": "whole answer from `python demo.py`",
              "trivial": "a Gradio page doing nothing, same sketchpad"}
    for name, figures in results.items():
        medians = [statistics.median(f[i] for f in figures) for i in range(3)]
        server = "—" if name == "handler" else f"{medians[1]:.0f}"
        print(f"| {labels[name]} | {medians[0]:.0f} | {server} | {medians[2]:.0f} |")


if __name__ == "__main__":
    main()
