"""Image loading that accepts what real folders contain and names the file when it cannot."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from fashionkp.errors import UserError


class ImageReadError(UserError, OSError):
    """An image that is missing, truncated or of an unsupported layout; the message names the file."""


def to_rgb8(image: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Convert grayscale, BGR(A)/RGBA, 16-bit or float images to contiguous RGB uint8.

    Arrays are taken as RGB(A) channel order; ``load_image`` converts OpenCV's BGR before calling this.
    """
    if image.dtype == np.uint16:
        image = (image / 257.0).round().astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(f"{source}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        # Composite transparent pixels onto white: product photos with alpha are cut-outs on white.
        alpha = image[:, :, 3:4].astype(np.float32) / 255.0
        image = (image[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ImageReadError(f"{source}: unsupported image shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageReadError(f"{source}: image too small ({image.shape[1]}x{image.shape[0]})")
    return np.ascontiguousarray(image)


def decode_image(data: bytes | np.ndarray, source: str) -> np.ndarray:
    """The (H, W, 3) RGB uint8 pixels of an image file's bytes; ``source`` names it in errors."""
    buffer = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED) if buffer.size else None
    if image is None:
        raise ImageReadError(f"cannot decode image (corrupt, truncated or not an image): {source}")
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA)
    return to_rgb8(image, source)


def load_image(path: Path | str) -> np.ndarray:
    """Read an image file as an (H, W, 3) RGB uint8 array."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    return decode_image(np.fromfile(str(path), dtype=np.uint8), str(path))
