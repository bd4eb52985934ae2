"""``fashionkp serve``: trained models behind an HTTP API and a web page, on LitServe (Lightning's serving library).

    POST /predict  a photo (the multipart field ``image``, or the whole request body) and optionally ``clothes``
                   (a form field or a query parameter; absent or ``auto``: the models' garment-type head decides)
                   -> JSON
    GET  /         the web page: pick or drop a photo, see its points and skeleton drawn, and the JSON
    GET  /health   ``ok`` once every model worker has loaded its models (LitServe's)
    GET  /info     the models, the garment types they serve and the limits (LitServe's, with our metadata)

The answer holds the garment type (given or predicted, with the head's probability where a model has a head), the
points of that type only, by name, in photo pixels with their scores, the skeleton edges between them, the photo's
width and height, the models' file names and the latency.

Requests are read, checked and decoded in the HTTP process, so that a bad one gets its 4xx there and never reaches
a model worker: LitServe fails a whole batch when one input of it raises, which would turn one bad upload into
errors for the good requests batched with it. What the workers receive are decoded photos and valid types only.
A bad request is answered with FastAPI's ``{"detail": "..."}``:

    400  no photo (empty body, no ``image`` field, a text field), a malformed multipart body
    413  a body over ``max_bytes`` (LitServe's limit) or a photo of more than ``max_pixels`` (read from its header,
         before any pixel is decoded)
    415  bytes that are not an image, or a truncated or corrupt one
    422  a photo under 2 pixels a side; an unknown garment type, one no model serves, or none given where no model
         has a garment-type head
"""

# No ``from __future__ import annotations`` here: LitServe gives the annotation of ``decode_request``'s argument to
# FastAPI as the endpoint's parameter type, and FastAPI must see the Annotated[..., Depends(...)] object itself.

import asyncio
import io
import os
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from PIL import Image
from starlette.datastructures import UploadFile

from fashionkp.data.images import ImageReadError, decode_image
from fashionkp.data.keypoints import CATEGORIES, CATEGORY_KEYPOINTS, KEYPOINT_NAMES, skeleton_for
from fashionkp.draw import PALETTE
from fashionkp.inference.predictor import KeypointPredictor, Predictions
from fashionkp.serving import MAX_BYTES, MAX_PIXELS

#: What ``clothes`` may be for the garment-type head to decide.
AUTO = ("", "auto")


@dataclass(frozen=True)
class Limits:
    """What the HTTP process checks a request against (set on the FastAPI app's state)."""

    max_pixels: int
    max_bytes: int
    categories: tuple[str, ...]  # the garment types some model serves
    identifies_types: bool  # some model has a garment-type head


@dataclass
class Photo:
    """A request as the model workers receive it: decoded and checked."""

    image: np.ndarray  # (H, W, 3) RGB uint8
    clothes: str | None  # None: the garment-type head decides
    received: float  # time.monotonic() when the request arrived: one clock for all processes of a machine


def check_clothes(clothes: str | None, limits: Limits) -> str | None:
    """The garment type a request asks for, or None for the head to decide; HTTP 422 for one that cannot be served."""
    clothes = None if clothes is None else clothes.strip().lower()
    if clothes is None or clothes in AUTO:
        if not limits.identifies_types:
            raise HTTPException(422, f"give clothes=<garment type> ({', '.join(limits.categories)}): none of the "
                                     "models has a garment-type head to tell it")  # fmt: skip
        return None
    if clothes not in CATEGORIES:
        raise HTTPException(
            422, f"unknown garment type clothes={clothes!r} (expected one of {', '.join(CATEGORIES)}, or auto)"
        )
    if clothes not in limits.categories:
        raise HTTPException(422, f"no model for garment type {clothes!r}: the models serve {list(limits.categories)}")
    return clothes


def decode_photo(data: bytes, max_pixels: int) -> np.ndarray:
    """The (H, W, 3) RGB uint8 pixels of an uploaded image file, decoded as ``load_image`` decodes a file (so that
    the server and the Python API see the same pixels); HTTPException for what cannot be served."""
    if not data:
        raise HTTPException(400, "no photo: 0 bytes (send the image file as the body, or as the multipart field "
                                 "'image': curl -F image=@photo.jpg)")  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size  # the header only: no pixel decoded yet
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"too many pixels: {e}; this server takes at most {max_pixels:,}") from None
    except Exception:  # Pillow's format plugins raise all sorts of errors on bytes that are no image
        raise HTTPException(415, "not an image (a JPEG, PNG, WebP, BMP or TIFF file is expected)") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"too many pixels: {width}x{height} is {width * height:,}, this server takes at "
                                 f"most {max_pixels:,} (fashionkp serve --max-pixels)")  # fmt: skip
    if min(width, height) < 2:
        raise HTTPException(422, f"the photo is too small ({width}x{height}): at least 2 pixels a side")
    try:  # as load_image decodes a file: the server and the Python API see the same pixels
        return decode_image(data, f"the {width}x{height} photo")
    except ImageReadError as e:
        raise HTTPException(415, f"{e} (a JPEG, PNG, WebP, BMP or TIFF file is expected)") from None


async def read_photo(request: Request) -> Photo:
    """The FastAPI dependency that turns a POST /predict into a :class:`Photo`, or into a 4xx answer."""
    received = time.monotonic()
    limits: Limits = request.app.state.fashionkp_limits
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limits.max_bytes:  # else LitServe stops reading past it, with a terser 413
        raise HTTPException(413, f"the request is {int(size):,} bytes, this server takes at most {limits.max_bytes:,} "
                                 "(fashionkp serve --max-bytes)")  # fmt: skip
    clothes = request.query_params.get("clothes")
    # Any other body is the image file itself, whatever its Content-Type: curl --data-binary says
    # application/x-www-form-urlencoded unless told otherwise, and such a form cannot hold a file anyway.
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form() as form:
            field = form.get("clothes")
            clothes = field if isinstance(field, str) else clothes
            upload = form.get("image")
            if upload is None:
                raise HTTPException(400, "no photo: the form has no field 'image' (curl -F image=@photo.jpg)")
            if not isinstance(upload, UploadFile):
                raise HTTPException(400, "the field 'image' must be a file (curl -F image=@photo.jpg), not text")
            data = await upload.read()
    else:
        data = await request.body()
    clothes = check_clothes(clothes, limits)
    # decoding a large photo takes a while: not on the event loop, which serves the other requests meanwhile
    image = await asyncio.to_thread(decode_photo, data, limits.max_pixels)
    return Photo(image, clothes, received)


def answer(found: Predictions, index: int, photo: Photo, models: list[str], model_ms: float) -> dict[str, Any]:
    """The JSON answer for one photo of a batch."""
    category = found.categories[index]
    probabilities = None
    # None also where no model with a type head saw the photo (an ensemble's NaN row): JSON has no NaN
    if found.type_probabilities is not None and np.isfinite(found.type_probabilities[index]).all():
        probabilities = {c: float(p) for c, p in zip(CATEGORIES, found.type_probabilities[index], strict=True)}
    points = {}
    for k in CATEGORY_KEYPOINTS[category]:
        x, y, score = found.points[index, k]
        points[KEYPOINT_NAMES[k]] = {"x": float(x), "y": float(y), "score": float(score)}
    height, width = photo.image.shape[:2]
    return {
        "type": {
            "name": category,
            "predicted": bool(found.predicted[index]),
            "probability": None if probabilities is None else probabilities[category],
            "probabilities": probabilities,
        },
        "points": points,
        "skeleton": [[KEYPOINT_NAMES[a], KEYPOINT_NAMES[b]] for a, b in skeleton_for(category)],
        "image": {"width": width, "height": height},
        "models": models,
        "latency_ms": round(1000 * (time.monotonic() - photo.received), 2),
        "model_ms": round(model_ms, 2),
        "batch_size": len(found.categories),
    }


class KeypointAPI(ls.LitAPI):
    """The model side: each worker process holds a :class:`KeypointPredictor` and runs a batch of photos at once."""

    def __init__(
        self,
        checkpoints: Sequence[Path | str],
        precision: str = "auto",
        threads: int = 0,
        max_batch_size: int = 8,
        batch_timeout: float = 0.01,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.checkpoints = [str(c) for c in checkpoints]
        self.precision, self.threads = precision, threads

    def setup(self, device: str) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.predictor = KeypointPredictor(
            self.checkpoints, device=device, precision=self.precision, onnx_threads=self.threads
        )
        self.models = self.predictor.model_names
        # A photo of every type through every model before /health says ready: the first request is not the slow one.
        blank = np.full((64, 48, 3), 128, np.uint8)
        self.predictor.predict_photos([blank] * len(self.predictor.categories), self.predictor.categories)

    # LitServe gives this annotation to FastAPI as the endpoint's parameter: read_photo runs in the HTTP process.
    def decode_request(self, request: Annotated[Photo, Depends(read_photo)]) -> Photo:
        return request

    def predict(self, x: Photo | list[Photo]) -> dict[str, Any] | list[dict[str, Any]]:
        # a list of photos when batching (max_batch_size > 1), else one
        photos = x if isinstance(x, list) else [x]
        start = time.monotonic()
        found = self.predictor.predict_photos([p.image for p in photos], [p.clothes for p in photos])
        model_ms = 1000 * (time.monotonic() - start)
        answers = [answer(found, i, photo, self.models, model_ms) for i, photo in enumerate(photos)]
        return answers if isinstance(x, list) else answers[0]


def _serve_the_page(app: FastAPI) -> None:
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    # LitServe answers GET / with a plain "litserve running": the page takes its place
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/"]

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def the_page() -> HTMLResponse:
        return HTMLResponse(page)


def build_server(
    checkpoints: Sequence[Path | str],
    device: str = "cpu",
    precision: str = "auto",
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    workers: int = 1,
    threads: int = 0,
    timeout: float = 30.0,
) -> ls.LitServer:
    """The LitServer of ``fashionkp serve``. ``threads`` per worker; 0: the CPU cores shared among the workers."""
    # Loaded once here, on the CPU: a missing or broken checkpoint is one line before any process starts, the ONNX
    # export is made (and cached) once for all workers, and the HTTP side learns which garment types to accept.
    predictor = KeypointPredictor(checkpoints, device="cpu", precision=precision)
    limits = Limits(max_pixels, max_bytes, tuple(predictor.categories), predictor.identifies_types)
    metadata = {
        "models": predictor.model_names,
        "clothes": list(limits.categories),
        "identifies_types": limits.identifies_types,
        "max_pixels": max_pixels,
        "max_bytes": max_bytes,
        # the colours of fashionkp's drawings (draw.py), for the page
        "colors": {name: "#{:02x}{:02x}{:02x}".format(*rgb) for name, rgb in zip(KEYPOINT_NAMES, PALETTE, strict=True)},
    }
    del predictor
    if device == "cpu" and not threads:
        threads = max(1, (os.cpu_count() or 1) // workers)
    api = KeypointAPI(checkpoints, precision, threads, max_batch_size, batch_timeout)
    server = ls.LitServer(
        api, accelerator=device, workers_per_device=workers, timeout=timeout, max_payload_size=max_bytes,
        model_metadata=metadata,
    )  # fmt: skip
    server.app.state.fashionkp_limits = limits
    _serve_the_page(server.app)
    return server


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(
    checkpoints: Sequence[Path | str], host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **options
) -> None:
    """Serve until interrupted (Ctrl+C or SIGTERM); ``options`` as :func:`build_server` takes them."""
    server = build_server(checkpoints, **options)
    names = ", ".join(Path(c).name for c in checkpoints)
    print(f"fashionkp serve: {names} -> http://{host}:{port}/ (the page), POST /predict, GET /health", flush=True)
    # SIGTERM (kill, docker stop, systemd) as Ctrl+C: LitServe's graceful shutdown then stops its worker processes,
    # which the default SIGTERM would leave running without a parent
    signal.signal(signal.SIGTERM, _interrupt)
    # One HTTP process: it only reads and decodes uploads; the models run in LitServe's worker processes.
    server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level=log_level)
