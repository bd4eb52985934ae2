"""fashionkp serve as its users meet it: the command in a subprocess on a loopback port, a real HTTP client, real
photos, bad uploads, many clients at once, and the web page in a real headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import FASHIONAI_TRAIN, ROOT, ServeProcess, needs_shared

from fashionkp.data.fashionai import read_splits
from fashionkp.data.images import load_image
from fashionkp.data.keypoints import CATEGORIES, CATEGORY_KEYPOINTS, KEYPOINT_NAMES

httpx = pytest.importorskip("httpx", reason="the dev extra is not installed")
pytest.importorskip("litserve", reason="the serve extra is not installed")
from fastapi import HTTPException  # noqa: E402  (after the skip: LitServe brings FastAPI)

from fashionkp.inference.predictor import KeypointPredictor  # noqa: E402
from fashionkp.serving.server import Limits, check_clothes  # noqa: E402

#: The test server's body limit: small, so that a 413 for a large body needs no large upload.
MAX_BYTES = 2_000_000
#: Where the page's screenshot is kept when the Chromium test runs (printed too).
SCREENSHOT = "serve_page.png"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints) -> Path:
    """A clothes=all checkpoint with a garment-type head."""
    return tiny_checkpoints["a"]


@pytest.fixture(scope="module")
def predictor(checkpoint) -> KeypointPredictor:
    """The Python API with the server's models, backend and precision (CPU: the ONNX export, fp32)."""
    return KeypointPredictor([checkpoint], device="cpu", precision="auto")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = [str(checkpoint), "--max-bytes", str(MAX_BYTES), "--max-batch-size", "8", "--log-level", "warning"]
    running = ServeProcess(args, log)
    try:
        running.wait_ready()
        yield running
    finally:
        left = running.stop()
    if Path("/proc/self/stat").is_file():
        assert not left, f"processes left running after SIGTERM: {left}"  # its model workers stop with it


@functools.cache
def first_photos(root: Path) -> dict[str, Path]:
    first = {}
    for record in read_splits(root):
        first.setdefault(record.category, record.image_path)
    return first


def photos(synth_data, real: bool) -> dict[str, Path]:
    """One photo of each garment type: FashionAI's, or the synthetic ones."""
    return first_photos(FASHIONAI_TRAIN if real else synth_data["train"])


def post(url: str, photo: bytes | Path, clothes: str | None = None, raw: bool = False, **kwargs) -> httpx.Response:
    data = photo.read_bytes() if isinstance(photo, Path) else photo
    if raw:  # the whole body is the photo, the type a query parameter
        params = {} if clothes is None else {"clothes": clothes}
        return httpx.post(f"{url}/predict", content=data, params=params, timeout=60, **kwargs)
    form = {} if clothes is None else {"clothes": clothes}
    return httpx.post(f"{url}/predict", files={"image": ("photo", data)}, data=form, timeout=60, **kwargs)


def assert_same_points(answer: dict, expected, category: str) -> None:
    """The answer's points are the Python API's (N=1 ``Predictions``), exactly; only the type's points."""
    own = CATEGORY_KEYPOINTS[category]
    assert list(answer["points"]) == [KEYPOINT_NAMES[k] for k in own]
    got = np.array([[p["x"], p["y"], p["score"]] for p in answer["points"].values()])
    np.testing.assert_array_equal(got, expected.points[0, list(own)])


@pytest.mark.parametrize(
    "real", [pytest.param(True, marks=needs_shared, id="fashionai"), pytest.param(False, id="synth")]
)
def test_photos_get_the_python_apis_points(server, predictor, checkpoint, synth_data, real):
    assert predictor.identifies_types
    for category, path in photos(synth_data, real).items():
        image = load_image(path)
        for clothes in (category, None):  # given, and told by the type head
            expected = predictor.predict_photos([image], [clothes])
            response = post(server.url, path, clothes)
            assert response.status_code == 200, response.text
            answer = response.json()
            told = expected.categories[0]
            assert answer["type"]["name"] == told and answer["type"]["predicted"] == (clothes is None)
            probabilities = dict(zip(CATEGORIES, expected.type_probabilities[0].tolist(), strict=True))
            assert answer["type"]["probabilities"] == probabilities
            assert answer["type"]["probability"] == probabilities[told]
            assert_same_points(answer, expected, told)
            assert answer["image"] == {"width": image.shape[1], "height": image.shape[0]}
            assert answer["models"] == [checkpoint.name]
            assert answer["latency_ms"] >= answer["model_ms"] > 0 and answer["batch_size"] >= 1
            names = set(answer["points"])
            assert answer["skeleton"] and all(a in names and b in names for a, b in answer["skeleton"])
    # the photo as the whole body, the type as a query parameter (curl --data-binary @photo.jpg)
    path = photos(synth_data, real)["dress"]
    response = post(server.url, path, "dress", raw=True)
    assert response.status_code == 200, response.text
    assert_same_points(response.json(), predictor.predict_photos([load_image(path)], ["dress"]), "dress")


def test_grey_rgba_and_16_bit_pngs_are_answered_like_the_files(server, predictor, synth_data, tmp_path):
    rgb = load_image(photos(synth_data, FASHIONAI_TRAIN.is_dir())["blouse"])
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([rgb[..., ::-1], np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None].repeat(len(rgb), 0)])
    deep = rgb[..., ::-1].astype(np.uint16) * 257 + 128
    for name, pixels in {"grey": grey, "rgba": rgba, "deep": deep}.items():
        path = tmp_path / f"{name}.png"
        cv2.imwrite(str(path), pixels)
        response = post(server.url, path, "blouse")
        assert response.status_code == 200, f"{name}: {response.text}"
        # the server decodes an upload as load_image decodes the file
        assert_same_points(response.json(), predictor.predict_photos([load_image(path)], ["blouse"]), "blouse")


def truncated_jpeg(synth_data) -> bytes:
    data = photos(synth_data, False)["dress"].read_bytes()
    return data[: len(data) // 2]


def png(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".png", pixels)[1].tobytes()


def bad_requests(synth_data) -> dict[str, tuple[dict, int, str]]:
    """name -> (post() arguments, the status, a part of the message)."""
    good = photos(synth_data, False)["dress"]
    forty_megapixels = png(np.zeros((5000, 8000), np.uint8))  # 40 MP in 40 kB: only its header is read
    return {
        "not an image": ({"photo": b"hello, this is text", "clothes": "dress"}, 415, "not an image"),
        "truncated JPEG": ({"photo": truncated_jpeg(synth_data), "clothes": "dress"}, 415, "cannot decode"),
        "empty body": ({"photo": b"", "clothes": "dress", "raw": True}, 400, "no photo: 0 bytes"),
        "empty file": ({"photo": b"", "clothes": "dress"}, 400, "no photo: 0 bytes"),
        "no image field": ({"files": {"clothes": (None, "dress")}}, 400, "no field 'image'"),
        "text image field": ({"files": {"image": (None, "photo.jpg")}}, 400, "must be a file"),
        "40 megapixels": ({"photo": forty_megapixels, "clothes": "dress"}, 413, "8000x5000 is 40,000,000"),
        "large body": ({"photo": os.urandom(MAX_BYTES + 1), "clothes": "dress", "raw": True}, 413, "at most"),
        "one pixel": ({"photo": png(np.zeros((1, 1, 3), np.uint8)), "clothes": "dress"}, 422, "too small"),
        "unknown clothes": ({"photo": good, "clothes": "hat"}, 422, "unknown garment type clothes='hat'"),
        "clothes=all": ({"photo": good, "clothes": "all"}, 422, "unknown garment type"),
    }


def send(url: str, arguments: dict) -> httpx.Response:
    arguments = dict(arguments)
    if "files" in arguments:  # a multipart form made by hand
        return httpx.post(f"{url}/predict", files=arguments["files"], timeout=60)
    return post(url, arguments.pop("photo"), **arguments)


def test_bad_requests_get_a_4xx_that_says_why(server, synth_data):
    for name, (arguments, status, message) in bad_requests(synth_data).items():
        response = send(server.url, arguments)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        assert message in response.json()["detail"], f"{name}: {response.text}"
    # nothing hung or died: the server still answers
    assert httpx.get(f"{server.url}/health", timeout=5).text == "ok"
    assert post(server.url, photos(synth_data, False)["skirt"], "skirt").status_code == 200


def test_garment_types_a_server_cannot_serve():
    per_type = Limits(max_pixels=100, max_bytes=100, categories=("skirt",), identifies_types=False)
    with pytest.raises(HTTPException, match="no model for garment type 'dress'") as refused:
        check_clothes("dress", per_type)
    assert refused.value.status_code == 422
    for clothes in (None, "", "auto"):  # no type given, and no head to tell it
        with pytest.raises(HTTPException, match="give clothes=<garment type> \\(skirt\\)"):
            check_clothes(clothes, per_type)
    assert check_clothes("auto", Limits(100, 100, CATEGORIES, True)) is None
    assert check_clothes(" Skirt", per_type) == "skirt"


def test_many_clients_at_once(server, synth_data):
    """200 photos from 8 clients at once, with bad uploads among them: batched, and no request fails."""
    good = list(photos(synth_data, FASHIONAI_TRAIN.is_dir()).items())
    bad = truncated_jpeg(synth_data)
    # every 11th request is a bad upload: it must get its 415 without failing the good photos batched with it
    jobs = [(None, bad) if i % 11 == 10 else good[i % len(good)] for i in range(220)]

    def one(job: tuple[str | None, Path | bytes]) -> tuple[int, int, float, int]:
        category, photo = job
        start = time.perf_counter()
        response = post(server.url, photo, category or "dress")
        elapsed = 1000 * (time.perf_counter() - start)
        expected = 200 if category else 415
        return response.status_code, expected, elapsed, response.json().get("batch_size", 0)

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as clients:
        results = list(clients.map(one, jobs))
    wall = time.perf_counter() - start
    errors = [(got, expected) for got, expected, _, _ in results if got != expected]
    latencies = sorted(ms for got, _, ms, _ in results if got == 200)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    batches = [size for *_, size in results]
    print(f"\nload: {len(latencies)} photos and {len(jobs) - len(latencies)} bad uploads from 8 clients in "
          f"{wall:.1f} s, {len(errors)} errors, latency p50 {p50:.0f} ms, p95 {p95:.0f} ms, largest batch "
          f"{max(batches)}")  # fmt: skip
    assert not errors and len(latencies) == 200
    assert max(batches) > 1  # concurrent requests ran as batches


def chromium_binary() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "chrome"))), None)


class DevTools:
    """Just enough of the Chrome DevTools protocol: a headless Chromium and one of its pages."""

    def __init__(self, binary: str, profile: Path) -> None:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1280,860", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose there
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            assert self.process.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        pages = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(p for p in pages if p["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.calls = 0

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events come in between; the answer carries the call's id
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"the page never got to: {expression}"
            time.sleep(0.2)
        return value

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # its renderer and GPU processes


def page_screenshot(url: str, photo: Path, profile: Path, screenshot: Path, clothes: str | None = None) -> dict:
    """Open the page in headless Chromium, upload ``photo`` through its file input, wait for the drawn points and
    save a screenshot; returns the points drawn (from the SVG's data attributes) and the JSON the page shows."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium; .ci/run installs it)")
    browser = DevTools(binary, profile)
    try:
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=860, deviceScaleFactor=1, mobile=False)
        browser.call("Page.navigate", url=url)
        browser.wait_for("document.querySelector('#clothes') && document.querySelector('#clothes').options.length")
        if clothes:
            browser.evaluate(f"document.querySelector('#clothes').value = {json.dumps(clothes)}")
        root = browser.call("DOM.getDocument")["root"]["nodeId"]
        node = browser.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        browser.call("DOM.setFileInputFiles", files=[str(photo)], nodeId=node)  # as a user picking the file
        circles = browser.wait_for(
            "[...document.querySelectorAll('#view circle[data-name]')].map(c => ({name: c.dataset.name, "
            "x: Number(c.dataset.x), y: Number(c.dataset.y), score: Number(c.dataset.score)}))"
        )
        # the photo is drawn too: the SVG image has loaded the picked file
        browser.wait_for("(() => { const i = document.querySelector('#view image'); return i && "
                         "i.getBBox().width > 0; })()")  # fmt: skip
        shown = json.loads(browser.evaluate("document.querySelector('#json').textContent"))
        status = browser.evaluate("document.querySelector('#status').textContent")
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        screenshot.write_bytes(base64.b64decode(shot))
    finally:
        browser.close()
    return {"circles": circles, "json": shown, "status": status}


def test_the_page_in_headless_chromium(server, synth_data, tmp_path):
    photo = photos(synth_data, FASHIONAI_TRAIN.is_dir())["dress"]
    screenshot = tmp_path / SCREENSHOT
    seen = page_screenshot(server.url, photo, tmp_path / "profile", screenshot)
    print(f"\nscreenshot of the page: {screenshot}")
    answer = seen["json"]
    assert seen["status"].endswith("done"), seen["status"]
    # every point of the answer is a circle at its place, and nothing else is
    assert [c["name"] for c in seen["circles"]] == list(answer["points"])
    for circle in seen["circles"]:
        point = answer["points"][circle["name"]]
        assert (circle["x"], circle["y"], circle["score"]) == (point["x"], point["y"], point["score"])
    assert len(seen["circles"]) == len(CATEGORY_KEYPOINTS[answer["type"]["name"]])
    image = cv2.imread(str(screenshot))
    assert image.shape[:2] == (860, 1280) and image.std() > 10  # a picture, not a blank page


def test_the_page_is_in_the_package():
    from importlib import resources

    page = resources.files("fashionkp.serving").joinpath("page.html").read_text()
    assert "http://" not in page.replace('"http://www.w3.org/2000/svg"', "")  # nothing from elsewhere: no CDN
    assert "serving/*.html" in (ROOT / "pyproject.toml").read_text()  # and it travels in the wheel
