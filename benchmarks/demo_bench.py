"""The demo page's answer time per drawing (`make bench` runs this after predict_bench.py).

A LeNet and its scratch twin are trained for one epoch into a temporary store; the page
(experiments/demo_app.py) is served in this process on 127.0.0.1, both models loaded. A drawing is what
the sketchpad sends: a 400×400 RGBA PNG, black strokes on a transparent canvas (here MNIST test digits,
enlarged). Three variants alternate in each round, on the same drawings:

- handler: the page's function alone (preprocessing once, both models, feature-map mosaics);
- page: the whole answer through gradio_client (upload of the drawing, queue, both models, every output);
- trivial: a Gradio endpoint that takes the same drawing and returns a string: the framework's fixed cost.

Wall and CPU milliseconds per answer (CPU: time.process_time of this process, which runs the server and
the client) are medians over rounds of the per-answer means.

    python benchmarks/demo_bench.py [--rounds 5] [--drawings 20]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from PIL import Image  # noqa: E402

from experiments.demo_app import CANVAS, ModelCache, Page, build_page, free_port  # noqa: E402
from experiments.models_store import runs_uri  # noqa: E402
from experiments.training import train  # noqa: E402


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


def timed(fn, items) -> tuple[float, float]:
    """Wall and CPU milliseconds per item of fn(item)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for item in items:
        fn(item)
    return ((time.perf_counter() - wall) * 1000 / len(items), (time.process_time() - cpu) * 1000 / len(items))


def trivial_app():
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as app:
        sketch, text = gr.Sketchpad(type="pil", image_mode="RGBA"), gr.Textbox()
        sketch.change(lambda value: "ok", sketch, text, api_name="draw")
    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--drawings", type=int, default=20)
    args = parser.parse_args()
    from gradio_client import Client, handle_file

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

    apps, clients = [], {}
    for name, app in (("page", build_page(cache, uri, "lenet-lab")), ("trivial", trivial_app())):
        port = free_port()
        app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        apps.append(app)
        clients[name] = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)

    def sketch(path):
        return {"background": None, "layers": [], "composite": handle_file(str(path))}

    variants = {
        "handler": (lambda picture: page.on_sketch({"composite": picture}, uri_a, uri_b), pictures),
        "page": (lambda path: clients["page"].predict(sketch(path), uri_a, uri_b, api_name="/draw"), paths),
        "trivial": (lambda path: clients["trivial"].predict(sketch(path), api_name="/draw"), paths),
    }
    for fn, items in variants.values():  # warm-up: first answers, connections
        timed(fn, items[:3])
    results = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (fn, items) in variants.items():
            results[name].append(timed(fn, items))
    for app in apps:
        app.close()

    print(f"demo page, two models (lenet + lenet_scratch), {len(paths)} drawings of {CANVAS}x{CANVAS} px, "
          f"median of {args.rounds} rounds")
    print("| variant | wall ms per answer | CPU ms per answer |\n|---|---:|---:|")
    labels = {"handler": "the page's function alone", "page": "whole answer through gradio_client",
              "trivial": "trivial Gradio endpoint, same drawing"}
    for name, figures in results.items():
        print(f"| {labels[name]} | {statistics.median(f[0] for f in figures):.0f} "
              f"| {statistics.median(f[1] for f in figures):.0f} |")


if __name__ == "__main__":
    main()
