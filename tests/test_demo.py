"""demo.py's page: started as a user starts it, driven in a real headless Chromium and through its API.

`pytest -m demo -rs` runs exactly these. The models come from a temporary store (a LeNet and its scratch
twin); the page is ``python demo.py tracking.uri=<that store>`` in its own process, on the free port it
prints. Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright's Python client: no browser is
downloaded.
"""

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from experiments import PROJECT_ROOT
from experiments.analysis import explain
from experiments.errors import UserError
from experiments.store.runs import runs_uri
from tests.conftest import CONF_DIR, free_port, stop_group, train_in_store, wait_until

pytestmark = pytest.mark.demo

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STARTUP_TIMEOUT = 180  # s: TensorFlow's import and two models loaded; ~20 s on an idle 2-core machine
ANSWER_TIMEOUT = 60_000  # ms, for the page to show an answer in the browser
# A 7 drawn in two strokes (fractions of the canvas): the bar across the top, then the stem down to the left.
SEVEN = [[(0.25, 0.2), (0.75, 0.2)], [(0.75, 0.2), (0.4, 0.85)]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LeNet and a scratch LeNet good enough to read digits (~97 %), in a temporary store."""
    uri, runs = train_in_store(tmp_path_factory.mktemp("demo_store"), {
        name: [f"model={name}", "data.train_size=20000", "data.test_size=1000", "trainer.epochs=3",
               "trainer.plots=false"]
        for name in ("lenet", "lenet_scratch")})
    return uri, runs


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """``python demo.py`` over the trained store, from an unrelated directory; yields its address."""
    uri, _ = trained
    work = tmp_path_factory.mktemp("demo_server")
    log = work / "demo.log"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(work / "gradio")}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "demo.py"), f"tracking.uri={uri}",
                                 f"hydra.run.dir={work}/hydra"], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        found = wait_until(lambda: re.search(r"LeNet Lab demo: (http://127\.0\.0\.1:\d+)", log.read_text()),
                           STARTUP_TIMEOUT, "demo.py printing its address", proc, log, 0.5)
        yield found.group(1), log
    finally:
        stop_group(proc)


def mnist_pngs(folder: Path, count: int, start: int = 0) -> tuple[list[Path], np.ndarray]:
    """MNIST test digits as dark-on-light PNG files (ink 0, paper 255) and their labels."""
    data = np.load(PROJECT_ROOT / "data" / "mnist.npz")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, digit in enumerate(data["x_test"][start:start + count], start):
        paths.append(folder / f"{index:05d}.png")
        Image.fromarray(255 - digit).save(paths[-1])
    return paths, data["y_test"][start:start + count]


def client_for(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def upload(client, path: Path, uri_a: str | None, uri_b: str | None, method: str = "gradcam") -> dict:
    """The page's answer to an uploaded file, by output: status, and label and view (HTML) of a and b."""
    from gradio_client import handle_file

    result = client.predict(handle_file(str(path)), uri_a, uri_b, method, api_name="/upload")
    names = ["status", *(f"{part}_{key}" for key in "ab" for part in ("label", "view"))]
    return dict(zip(names, result, strict=True))


def pictures(view: str | None) -> dict[str, list[np.ndarray]]:
    """The pictures of one model's answer (its HTML view) by part: seen, why, maps."""
    found = {}
    for part, data in re.findall(r'<img data-part="(\w+)" src="data:image/png;base64,([^"]+)"', view or ""):
        found.setdefault(part, []).append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))))
    return found


# --- in a real browser ------------------------------------------------------------------------------------


def answer_shown(page, key: str) -> str:
    """The class the page shows as model ``key``'s answer, once it shows one."""
    heading = page.locator(f"#answer-{key} .output-class")
    heading.wait_for(timeout=ANSWER_TIMEOUT)
    return heading.inner_text().strip()


def quiet_after(page, requests: list[float], seconds: float = 2.0) -> None:
    """Return once the page has sent no request for ``seconds`` (``requests``: the times it sent them)."""
    deadline = time.monotonic() + ANSWER_TIMEOUT / 1000
    while time.monotonic() - max(requests, default=0.0) < seconds:
        assert time.monotonic() < deadline, "the page kept sending requests"
        page.wait_for_timeout(200)


def draw(page, strokes) -> None:
    """Mouse strokes on the sketchpad's canvas, each a list of points as fractions of the canvas."""
    page.locator("#sketchpad button[aria-label='Brush']").first.click()
    box = page.locator("#sketchpad canvas").first.bounding_box()
    for stroke in strokes:
        (x, y), rest = stroke[0], stroke[1:]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in rest:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=12)
        page.mouse.up()


@pytest.fixture
def chromium():
    """A headless Debian Chromium under Playwright; skipped where either is missing."""
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the page is not checked in a browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright's Python client is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def test_in_chromium_an_uploaded_digit_and_a_drawn_seven_are_read_by_both_models(server, trained, chromium,
                                                                                   tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    url, _ = server
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    requests = []
    page.on("request", lambda request: requests.append(time.monotonic()))
    page.goto(url)
    page.locator("#sketchpad canvas").first.wait_for(timeout=ANSWER_TIMEOUT)
    # The defaults (no champion registered): the best lenet and the best lenet_scratch run.
    assert page.locator("#model-a input").input_value().startswith("lenet: run")
    assert page.locator("#model-b input").input_value().startswith("lenet_scratch: run")

    draw(page, SEVEN)
    assert answer_shown(page, "a") == answer_shown(page, "b") == "7"
    page.locator("#maps-b img").nth(3).wait_for(timeout=ANSWER_TIMEOUT)  # conv, pool, conv, pool
    for key in "ab":
        assert page.locator(f"#maps-{key} img").count() == 4
        assert page.locator(f"#seen-{key} img").count() == page.locator(f"#why-{key} img").count() == 1
        assert page.locator(f"#why-{key} figcaption").inner_text() == "why 7? Grad-CAM"  # conf/demo.yaml's method
        assert page.locator(f"#chart-{key} .bar").count() == 10  # a bar per class
        assert page.locator(f"#why-{key} img").evaluate("img => img.complete && img.naturalWidth") == 28  # decoded

    page.get_by_role("radio", name="Integrated Gradients").check()  # the same drawing, explained again
    captions = "() => ['a', 'b'].every(key => document.querySelector(`#why-${key} figcaption`)?.innerText" \
               ".startsWith('why 7? Integrated Gradients'))"
    page.wait_for_function(captions, timeout=ANSWER_TIMEOUT)

    (path,), (label,) = mnist_pngs(tmp_path, 1, start=1)  # a 2: the answer must change from the drawn 7
    page.get_by_role("tab", name="upload").click()
    quiet_after(page, requests)  # the sketchpad sends its layers again up to ~1 s after the stroke: let it finish
    page.locator("#upload input[type=file]").set_input_files(str(path))
    # Wait for the state the upload must end in (its name in the status line, its answer in both columns): the
    # columns are briefly empty in between.
    settled = ("([name, label]) => document.querySelector('#status')?.innerText.includes(name) && ['a', 'b'].every("
               "key => document.querySelector(`#answer-${key} .output-class`)?.innerText.trim() === label)")
    try:
        page.wait_for_function(settled, arg=[path.name, str(label)], timeout=ANSWER_TIMEOUT)
    except PlaywrightTimeout:
        pass  # the assertions below say what the page shows instead
    assert answer_shown(page, "a") == answer_shown(page, "b") == str(label)
    assert path.name in page.locator("#status").inner_text()


def test_a_store_without_models_says_make_train(tmp_path, chromium):
    """Page and API over an empty store: no model, the page says so and names `make train`."""
    from experiments.apps.demo import ModelCache, build_page

    page_app = build_page(ModelCache("gradcam"), f"sqlite:///{tmp_path / 'mlflow.db'}", "nothing-here", "gradcam")
    port = free_port()
    page_app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        (path,), _ = mnist_pngs(tmp_path / "digits", 1)
        status = upload(client_for(f"http://127.0.0.1:{port}/"), path, None, None)["status"]
        assert "No trained model" in status and "make train" in status
        page = chromium.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('make train')",
                               timeout=ANSWER_TIMEOUT)
    finally:
        page_app.close()


# --- through the API ------------------------------------------------------------------------------------


def predict_py_answers(uri: str, run_id: str, folder: Path, output_dir: Path) -> dict[str, str]:
    """predict.py's predicted class per file name, for a folder and one run."""
    import csv

    from experiments.apps.predict import predict

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="predict", overrides=[f"images={folder}", f"run_id={run_id}",
                                                        f"tracking.uri={uri}", f"output_dir={output_dir}"])
    assert predict(cfg) == 0
    with open(output_dir / "predictions.csv", newline="") as f:
        return {row["image"]: row["prediction"] for row in csv.DictReader(f)}


@pytest.mark.slow
def test_api_answers_100_test_digits_as_predict_py_does(server, trained, tmp_path):
    url, _ = server
    uri, runs = trained
    paths, labels = mnist_pngs(tmp_path / "digits", 100)
    expected = {key: predict_py_answers(uri, runs[name], tmp_path / "digits", tmp_path / name)
                for key, name in (("a", "lenet"), ("b", "lenet_scratch"))}
    client = client_for(url)
    shown = {"a": [], "b": []}
    for path in paths:
        answer = upload(client, path, runs_uri(runs["lenet"]), runs_uri(runs["lenet_scratch"]))
        for key in "ab":
            shown[key].append(answer[f"label_{key}"]["label"])
            assert [len(images) for images in pictures(answer[f"view_{key}"]).values()] == [1, 1, 4], path
    for key in "ab":
        assert shown[key] == [expected[key][path.name] for path in paths], key
    # The models read MNIST's own digits well (a check that the answers are not all one class).
    assert (np.array(shown["a"], int) == labels).mean() >= 0.9


def test_an_unreadable_upload_is_a_message_and_the_page_keeps_answering(server, trained, tmp_path):
    url, log = server
    _, runs = trained
    (good,), (label,) = mnist_pngs(tmp_path, 1, start=3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    client = client_for(url)
    a, b = runs_uri(runs["lenet"]), runs_uri(runs["lenet_scratch"])
    answer = upload(client, broken, a, b)
    assert answer["status"].startswith("**Cannot use the upload**: cannot read broken.png"), answer["status"]
    assert not answer["label_a"] and not answer["view_a"]  # nothing from a previous image stays
    answer = upload(client, good, a, b)
    assert answer["label_a"]["label"] == answer["label_b"]["label"] == str(label)
    assert "Traceback" not in log.read_text()


# --- pieces ---------------------------------------------------------------------------------------------


def test_default_models_are_lenet_and_its_scratch_twin_champions_first():
    from experiments.apps.demo import ModelOption, default_pair

    def option(model, uri):
        return ModelOption(model, uri, model)

    runs = [option("vgg_tiny", "runs:/v"), option("lenet_scratch", "runs:/s"), option("lenet", "runs:/l")]
    champion = option("lenet", "models:/lenet-lab-lenet@champion")
    assert default_pair(runs) == ("runs:/l", "runs:/s")
    assert default_pair([champion, *runs]) == ("models:/lenet-lab-lenet@champion", "runs:/s")
    assert default_pair(runs[:1]) == ("runs:/v", "runs:/v")
    assert default_pair([runs[0], runs[2]]) == ("runs:/l", "runs:/v")
    assert default_pair([]) == (None, None)


def test_mosaic_puts_each_map_in_its_cell_rescaled():
    from experiments.apps.demo import mosaic

    maps = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    image = mosaic(maps)
    assert image.shape == (2 * 5 - 1, 3 * 4 - 1) and image.dtype == np.uint8  # 3 columns, 2 rows
    for k in range(5):
        top, left = (k // 3) * 5, (k % 3) * 4
        cell = image[top:top + 4, left:left + 3].astype(float)
        expected = (maps[..., k] - maps[..., k].min()) / np.ptp(maps[..., k]) * 255
        np.testing.assert_allclose(cell, expected, atol=0.5 + 1e-9)
    assert (image[4] == 255).all() and (image[:, 3] == 255).all()  # the gaps


def test_beside_each_answer_is_explain_py_s_map_of_its_class_by_the_chosen_method(server, store, tmp_path):
    """Each model's map on the page is what experiments.analysis.explain computes for the same prepared image and
    the class the model answered, drawn as predict.py draws it, for the page's first method and a signed one."""
    from experiments.analysis.plots import overlay
    from experiments.apps.demo import to_uint8
    from experiments.store.logged import load_model
    from experiments.use.images import normalise, prepare, read_image

    url, _ = server
    _, runs = store
    (path,), _ = mnist_pngs(tmp_path, 1, start=4)
    uris = {"a": runs_uri(runs["lenet"]), "b": runs_uri(runs["lenet_scratch"])}
    expected = {}  # per model: the prepared pixels, the normalised input, its class, its data settings
    for key, uri in uris.items():
        loaded = load_model(uri)
        mean, std = (np.asarray(list(v), np.float32) for v in (loaded.data.mean, loaded.data.std))
        pixels = prepare(read_image(path), tuple(loaded.data.input_shape))
        x = normalise(pixels, mean, std)[None]
        expected[key] = (loaded, pixels, x, int(np.asarray(loaded.model(x)).argmax()), explain.blank(mean, std))
    client = client_for(url)
    for method in ("gradcam", "ig"):
        shown = upload(client, path, uris["a"], uris["b"], method)
        for key, (loaded, pixels, x, answered, baseline) in expected.items():
            assert shown[f"label_{key}"]["label"] == str(loaded.data.class_names[answered])
            heat = explain.explain(loaded.model, x, [answered], method, baseline)[0]
            drawn = to_uint8(overlay(pixels, heat, method in explain.SIGNED)).astype(int)
            seen = pictures(shown[f"view_{key}"])
            np.testing.assert_array_equal(seen["seen"][0], to_uint8(pixels))
            difference = np.abs(seen["why"][0].astype(int) - drawn).max()
            assert difference <= 1, (key, method, difference)  # traced graph vs eager ops: float rounding
            assert f"why {answered}? {explain.TITLES[method]}" in shown[f"view_{key}"]


def test_the_page_offers_every_method_of_explain_py():
    from experiments.config import CHOICES

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert compose(config_name="demo").method in explain.METHODS
    assert CHOICES["method"] == explain.METHODS


def test_bad_port_is_one_line_naming_it():
    from experiments.config import check_demo

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="demo", overrides=["port=70000"])
    with pytest.raises(UserError, match=r"^port must be an integer in 1\.\.65535 or null \(a free one\), got 70000"):
        check_demo(cfg)


def test_champions_come_first_in_the_choices_and_are_the_defaults(tmp_path):
    """A registered champion (here a version made by hand) is offered before the runs and opens the page."""
    from mlflow import MlflowClient

    from experiments.apps.demo import default_pair, model_options

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("lenet-lab-lenet_scratch")
    version = client.create_model_version("lenet-lab-lenet_scratch", source=str(tmp_path / "model"),
                                          tags={"val_accuracy": "0.9876"})
    client.set_registered_model_alias("lenet-lab-lenet_scratch", "champion", version.version)
    client.create_registered_model("lenet-lab-vgg_tiny")  # no champion alias: not offered
    options = model_options(uri, "no-runs-here")
    assert [(o.label, o.uri) for o in options] == [
        ("lenet_scratch: registered champion, val_accuracy 0.9876", "models:/lenet-lab-lenet_scratch@champion")]
    assert default_pair(options) == ("models:/lenet-lab-lenet_scratch@champion",) * 2
