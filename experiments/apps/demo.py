"""The demo page behind ``demo.py``: draw a digit (or upload a photo of one) and watch two models read it.

For each of the two models picked on the page, every drawing shows the image the model sees (the same
preprocessing as ``predict.py``, ``experiments.use.images``), the map of the pixels behind its answer (the
method chosen on the page, ``experiments.analysis.explain``), its class probabilities and the feature maps of
every conv and pooling layer. The models are the store's registered champions and FINISHED runs; each is
loaded once, on first use, and kept (`ModelCache`); each model answers with one traced graph per method.

    page = build_page(ModelCache("gradcam"), tracking_uri, experiment, "gradcam")
    page.launch(server_name="127.0.0.1", server_port=port)
"""

import base64
import html
import io
import logging
import os
import socket
import threading
from dataclasses import dataclass

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network: nothing is reported anywhere

import gradio as gr  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

from experiments import start_up_done  # noqa: E402
from experiments.analysis import explain as explanations  # noqa: E402
from experiments.analysis.plots import overlay  # noqa: E402
from experiments.config import check_demo  # noqa: E402
from experiments.errors import UserError  # noqa: E402
from experiments.store.logged import LoadedModel, load_model  # noqa: E402
from experiments.store.registry import CHAMPION, NAME_PREFIX, champion_uri, champion_version  # noqa: E402
from experiments.store.runs import finished_runs, runs_uri  # noqa: E402
from experiments.store.tracking import check_store  # noqa: E402
from experiments.use.images import ImageError, normalise, prepare, read_image, to_rgb  # noqa: E402

DEFAULT_MODELS = ("lenet", "lenet_scratch")  # the two shown first: a builtin model and its scratch twin
# Pictures go to the browser inside the answer's HTML, as PNG data at their true size (no file written, cached
# or fetched per picture: docs/performance.md); the browser enlarges them, pixels as blocks rather than blurred.
CSS = """
.view figure { margin: 0; } .view figcaption { font-size: 0.85em; text-align: center; }
.view img { width: 100%; image-rendering: pixelated; }
.view .pair { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; max-width: 360px; }
.view .maps { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
.view .bars { margin: 12px 0; } .view h4 { margin: 12px 0 4px; }
.view .bar { display: grid; grid-template-columns: 2.5em 1fr 3.5em; align-items: center; gap: 6px; }
.view .bar i { display: block; height: 0.8em; background: var(--color-accent); }
.view .bar b { font-weight: normal; text-align: right; }
"""
CANVAS = 400  # sketchpad pixels per side
BRUSH_RADIUS = 16  # a stroke about a tenth of a digit drawn across the canvas, as thick as MNIST's pen
HINT = "Draw a digit with the mouse or a finger, or upload a photo."
METHOD_INFO = ("Grad-CAM: where the last conv layer found the class; Saliency and SmoothGrad: the pixels whose "
               "change moves its score most; Integrated Gradients: the ink for (red) and against (blue) it.")
NO_MODEL = ("**No trained model in the store** ({where}). Train one with `make train` "
            "(or `make train ARGS=model=lenet_scratch`), then reload this page.")


# --- the models on offer ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOption:
    """One entry of the model dropdowns: what the user reads, the MLflow model URI, the model's name."""

    label: str
    uri: str
    model: str


def champion_options(client: MlflowClient) -> list[ModelOption]:
    """``models:/lenet-lab-<model>@champion`` of every registered model that has the alias."""
    options = []
    for registered in client.search_registered_models(filter_string=f"name LIKE '{NAME_PREFIX}%'"):
        model = registered.name[len(NAME_PREFIX):]
        uri = champion_uri(client, model)
        if uri:
            accuracy = champion_version(client, model).tags.get("val_accuracy")
            shown = f", val_accuracy {float(accuracy):.4f}" if accuracy else ""
            options.append(ModelOption(f"{model}: registered {CHAMPION}{shown}", uri, model))
    return sorted(options, key=lambda option: option.model)


def model_options(uri: str, experiment: str) -> list[ModelOption]:
    """The champions (by model name), then the experiment's FINISHED runs, best val_accuracy first."""
    client = MlflowClient(uri)
    runs = [ModelOption(f"{run.data.tags.get('model', '?')}: run {run.info.run_id[:8]}, val_accuracy "
                        f"{run.data.metrics['val_accuracy']:.4f}, seed {run.data.params.get('seed', '?')}",
                        runs_uri(run.info.run_id), run.data.tags.get("model", "?"))
            for run in finished_runs(client, experiment)]
    return champion_options(client) + runs


def default_pair(options: list[ModelOption]) -> tuple[str | None, str | None]:
    """The first option (champion, else best run) of lenet and of lenet_scratch; models missing from the
    store are replaced by the next options in the list; None when there are none."""
    chosen = [next((o.uri for o in options if o.model == model), None) for model in DEFAULT_MODELS]
    spare = iter(o.uri for o in options if o.uri not in chosen)
    a, b = (uri or next(spare, None) for uri in chosen)
    return a or b, b or a  # a single model in the store: in both columns


# --- a model and what it shows ------------------------------------------------------------------------


def spatial_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers whose output is a stack of maps (batch, H, W, F): every conv and pooling layer."""
    return [layer for layer in model.layers if len(layer.output.shape) == 4]


class Probe:
    """A loaded model answering with its class probabilities, every spatial layer's maps and an explanation map
    of its answer's class, in one call of one traced graph per explanation method (made on the method's first
    use): eager TensorFlow would cost ~10x more in Python overhead than the math (docs/performance.md).

    Args:
        loaded: the model and its data settings, as ``experiments.store.logged.load_model`` returns them.
    """

    def __init__(self, loaded: LoadedModel):
        self.model, self.data = loaded.model, loaded.data
        # as arrays once: numpy reads an OmegaConf list slowly (~3 ms an image)
        self.mean, self.std = (np.asarray(list(values), np.float32) for values in (self.data.mean, self.data.std))
        self.layers = spatial_layers(self.model)
        self.network = keras.Model(self.model.inputs[0],
                                   [self.model.outputs[0], *[layer.output for layer in self.layers]])
        self.input = tf.TensorSpec((1, *[int(n) for n in self.data.input_shape]), tf.float32)  # one image
        self.graphs = {}  # method -> its traced function
        self.lock = threading.Lock()

    def graph(self, method: str):
        """The traced ``x -> [probabilities, *layer maps, method's map of the most probable class]``."""
        with self.lock:
            if method not in self.graphs:
                maps_of = explanations.map_function(self.model, method, explanations.blank(self.mean, self.std))

                def run(x):
                    outputs = self.network(x, training=False)
                    return [*outputs, maps_of(x, tf.argmax(outputs[0], axis=-1, output_type=tf.int32))]

                self.graphs[method] = tf.function(run, input_signature=[self.input])
            return self.graphs[method]

    def __call__(self, pixels: np.ndarray, method: str) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Pixels (h, w, c) in [0, 1] -> probabilities (classes,), each layer's maps (H, W, F) by name and
        ``method``'s map (h, w) of the most probable class."""
        x = normalise(pixels, self.mean, self.std)[None]
        *outputs, heat = [out.numpy()[0] for out in self.graph(method)(tf.constant(x))]
        return outputs[0], {layer.name: maps for layer, maps in zip(self.layers, outputs[1:], strict=True)}, heat


class ModelCache:
    """Each model URI loaded once (on first use) and kept for the life of the page, its graph for ``method``
    (the page's first method) traced when it is loaded."""

    def __init__(self, method: str):
        self.method = method
        self.probes: dict[str, Probe] = {}
        self.lock = threading.Lock()

    def get(self, uri: str) -> Probe:
        """The probe of ``uri``; ``UserError`` (one line naming the URI) when it cannot be loaded."""
        with self.lock:
            if uri not in self.probes:
                probe = Probe(load_model(uri))
                probe(np.zeros(probe.data.input_shape, np.float32), self.method)  # traced now, not on first use
                self.probes[uri] = probe
            return self.probes[uri]


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(h, w, c) in [0, 1] -> uint8 (h, w), or (h, w, 3) for colour."""
    image = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    return image[..., 0] if image.shape[-1] == 1 else image


def mosaic(maps: np.ndarray) -> np.ndarray:
    """A layer's maps (H, W, F) as one uint8 image: each map rescaled to its own [min, max] (bright = strong),
    in a square-ish grid (⌈√F⌉ columns), one white pixel between maps."""
    h, w, f = maps.shape
    low, high = maps.min(axis=(0, 1)), maps.max(axis=(0, 1))
    tiles = ((maps - low) / np.where(high > low, high - low, 1) * 255).round().astype(np.uint8)
    cols = int(np.ceil(np.sqrt(f)))
    rows = -(-f // cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), 255, np.uint8)
    for k in range(f):
        top, left = (k // cols) * (h + 1), (k % cols) * (w + 1)
        out[top:top + h, left:left + w] = tiles[..., k]
    return out


@dataclass(frozen=True)
class Answer:
    """What one model makes of one image."""

    seen: np.ndarray  # the image the model sees, uint8
    why: np.ndarray  # the explanation map over it, RGB uint8
    why_caption: str
    label: dict[str, float]  # class name -> probability, in the model's class order (gr.Label)
    maps: list[tuple[np.ndarray, str]]  # (mosaic, caption) per spatial layer


def answer(probe: Probe, pixels: np.ndarray, method: str) -> Answer:
    """The probe's answer for prepared pixels (``images.prepare``: ``predict.py``'s preprocessing), explained by
    ``method`` (drawn as ``predict.py`` draws it: ``plots.overlay``)."""
    probabilities, maps, heat = probe(pixels, method)
    names = [str(name) for name in probe.data.class_names]
    signed = method in explanations.SIGNED
    return Answer(
        to_uint8(pixels),
        to_uint8(overlay(pixels, heat, signed)),
        f"why {names[int(probabilities.argmax())]}? {explanations.TITLES[method]}"
        + (" (red: for, blue: against)" if signed else ""),
        {name: float(p) for name, p in zip(names, probabilities, strict=True)},
        [(mosaic(m), f"{name}: {m.shape[0]}×{m.shape[1]}×{m.shape[2]}") for name, m in maps.items()])


def png_data(image: np.ndarray) -> str:
    """A uint8 image (h, w) or (h, w, 3) as a ``data:`` URL of its PNG file (fastest compression)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png", compress_level=1)
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def figure(image: np.ndarray, caption: str, part: str, elem_id: str = "") -> str:
    """An ``<img>`` (``data-part``: what it shows) with its caption."""
    shown = f' id="{elem_id}"' if elem_id else ""
    return (f'<figure{shown}><img data-part="{part}" src="{png_data(image)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def view(result: Answer, key: str) -> str:
    """One model's answer as HTML (ids ``seen-<key>``, ``why-<key>``, ``chart-<key>``, ``maps-<key>``): the image
    it sees and the map behind its answer side by side, a bar per class, then the feature maps."""
    bars = "".join(f'<div class="bar"><span>{html.escape(name)}</span><i style="width: {100 * p:.1f}%"></i>'
                   f"<b>{p:.3f}</b></div>" for name, p in result.label.items())
    maps = "".join(figure(image, caption, "maps") for image, caption in result.maps)
    return (f'<div class="view"><div class="pair">'
            f'{figure(result.seen, "what the model sees (28×28)", "seen", f"seen-{key}")}'
            f'{figure(result.why, result.why_caption, "why", f"why-{key}")}</div>'
            f'<h4>class probabilities</h4><div class="bars" id="chart-{key}">{bars}</div>'
            f'<h4>feature maps: every conv and pooling layer</h4><div class="maps" id="maps-{key}">{maps}</div></div>')


# --- the page -------------------------------------------------------------------------------------------


def sketch_rgb(value) -> np.ndarray | None:
    """The sketchpad's picture (its composite, PIL RGBA: strokes on a transparent canvas) as RGB on white;
    None when nothing is drawn."""
    composite = (value or {}).get("composite")
    if composite is None or composite.getextrema()[-1][1] == 0:  # fully transparent: an empty canvas
        return None
    return to_rgb(composite)


class Page:
    """The page's handlers, over a model cache and a tracking store."""

    def __init__(self, cache: ModelCache, uri: str, experiment: str):
        self.cache, self.uri, self.experiment = cache, uri, experiment

    def options(self) -> list[ModelOption]:
        return model_options(self.uri, self.experiment)

    def no_model_message(self) -> str:
        return NO_MODEL.format(where=f"experiment {self.experiment!r} at {self.uri}")

    def show(self, rgb: np.ndarray | None, uri_a: str | None, uri_b: str | None, method: str, source: str) -> list:
        """Status line, then per model: its answer (gr.Label) and the rest of it as HTML (``view``); None where
        there is nothing to show."""
        columns, notes, prepared = [], [], {}
        for key, uri in zip("ab", (uri_a, uri_b), strict=True):
            empty = [None, None]
            if not uri:
                notes.append(self.no_model_message())
            elif rgb is not None:
                try:
                    probe = self.cache.get(uri)
                    shape = tuple(probe.data.input_shape)
                    if shape not in prepared:  # once for both models when they read the same input
                        prepared[shape] = prepare(rgb, shape, source=source)
                    result = answer(probe, prepared[shape], method)
                except ImageError:
                    notes.append(f"No ink found on {source}: draw a digit, or upload a photo of one.")
                except UserError as e:
                    notes.append(f"Model {uri}: {e}")
                else:
                    empty = [result.label, view(result, key)]
            columns.append(empty)
        status = " \n".join(dict.fromkeys(notes)) or (HINT if rgb is None else f"Reading {source}.")
        return [status, *columns[0], *columns[1]]

    def on_sketch(self, value, uri_a, uri_b, method) -> list:
        rgb = sketch_rgb(value)
        return [rgb, *self.show(rgb, uri_a, uri_b, method, "the drawing")]

    def on_upload(self, path, uri_a, uri_b, method) -> list:
        if not path:
            return [None, *self.show(None, uri_a, uri_b, method, "")]
        name = os.path.basename(path)
        try:
            rgb = read_image(path)
        except ImageError as e:
            return [None, f"**Cannot use the upload**: {str(e).replace(str(path), name)}",
                    *self.show(None, uri_a, uri_b, method, "")[1:]]
        return [rgb, *self.show(rgb, uri_a, uri_b, method, name)]

    def on_choice(self, rgb, uri_a, uri_b, method) -> list:
        """Another model or method: the current image read again."""
        return self.show(rgb, uri_a, uri_b, method, "the image")

    def on_load(self) -> list:
        """The dropdowns' choices read from the store at each page load (new runs show without a restart)."""
        options = self.options()
        choices = [(o.label, o.uri) for o in options]
        a, b = default_pair(options)
        status = HINT if options else self.no_model_message()
        return [gr.Dropdown(choices=choices, value=a), gr.Dropdown(choices=choices, value=b), status]


def model_column(key: str, choices: list[tuple[str, str]], value: str | None) -> list:
    """One model's components: dropdown, its answer, then the rest of it (``view``). Their elem_ids end in
    ``-<key>`` (``model-a``, ``answer-a``, ``view-b``)."""
    with gr.Column():
        gr.Markdown(f"### model {key.upper()}")
        dropdown = gr.Dropdown(label="model", choices=choices, value=value, interactive=True, elem_id=f"model-{key}")
        label = gr.Label(label="answer", num_top_classes=3, elem_id=f"answer-{key}")
        shown = gr.HTML(elem_id=f"view-{key}")
    return [dropdown, label, shown]


def build_page(cache: ModelCache, uri: str, experiment: str, method: str) -> gr.Blocks:
    """The Gradio page: sketchpad and upload, the explanation method (``method`` first), two model columns, live
    answers. The dropdowns offer the store's models as they are now (for API clients) and as they are at each
    page load (in a browser)."""
    page = Page(cache, uri, experiment)
    options = page.options()
    choices, (default_a, default_b) = [(o.label, o.uri) for o in options], default_pair(options)
    with gr.Blocks(title="LeNet Lab: draw a digit", analytics_enabled=False) as blocks:
        gr.Markdown("## Draw a digit, watch the network think\nEach stroke goes through the model as "
                    "`predict.py` feeds it: the ink is centred in a 28×28 field like MNIST's digits. Beside "
                    "each answer, the map of the pixels it came from.")
        rgb = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("draw"):
                    sketch = gr.Sketchpad(label="draw a digit", type="pil", image_mode="RGBA",
                                          canvas_size=(CANVAS, CANVAS), fixed_canvas=True, layers=False,
                                          transforms=(), elem_id="sketchpad",
                                          brush=gr.Brush(default_size=BRUSH_RADIUS, colors=["#000000"],
                                                         color_mode="fixed"))
                with gr.Tab("upload"):
                    upload = gr.File(label="a photo or scan of a digit", type="filepath", elem_id="upload")
                status = gr.Markdown(elem_id="status")
                explain = gr.Radio([(explanations.TITLES[m], m) for m in explanations.METHODS], value=method,
                                   label="why: the map of the answer's class", info=METHOD_INFO, elem_id="method")
            with gr.Column(scale=2), gr.Row():
                a = model_column("a", choices, default_a)
                b = model_column("b", choices, default_b)
        outputs = [status, *a[1:], *b[1:]]
        live = {"trigger_mode": "always_last", "show_progress": "hidden"}
        sketch.change(page.on_sketch, [sketch, a[0], b[0], explain], [rgb, *outputs], api_name="draw", **live)
        upload.change(page.on_upload, [upload, a[0], b[0], explain], [rgb, *outputs], api_name="upload", **live)
        for choice in (a[0], b[0], explain):
            choice.input(page.on_choice, [rgb, a[0], b[0], explain], outputs, api_visibility="private", **live)
        blocks.load(page.on_load, None, [a[0], b[0], status], api_visibility="private")
    return blocks


# --- serving ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1, chosen by the system."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cfg) -> None:
    """Run demo.py's configuration: load the default models, then serve the page until Ctrl-C."""
    import mlflow

    check_demo(cfg)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request Gradio makes to itself
    uri = check_store(cfg.tracking.uri)
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve against the global tracking URI
    cache = ModelCache(cfg.method)
    options = model_options(uri, cfg.tracking.experiment)
    if not options:
        print(NO_MODEL.format(where=f"experiment {cfg.tracking.experiment!r} at {uri}").replace("**", ""))
    for chosen in dict.fromkeys(u for u in default_pair(options) if u):
        print(f"loading {chosen}", flush=True)
        cache.get(chosen)
    port = cfg.port or free_port()
    page = build_page(cache, uri, cfg.tracking.experiment, cfg.method)
    start_up_done()
    print(f"LeNet Lab demo: http://127.0.0.1:{port}  (Ctrl-C stops it)", flush=True)
    page.launch(server_name="127.0.0.1", server_port=port, share=False, inbrowser=False, quiet=True,
                show_error=True, css=CSS)


def main(cfg) -> None:
    """``python demo.py``: serve the page until Ctrl-C."""
    serve(cfg)
