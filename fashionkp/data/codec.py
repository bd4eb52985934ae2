"""The heatmap codec: the one place that knows how points become heatmaps and heatmaps become points.

:class:`HeatmapCodec` owns the convention (stride, target sigmas, which points are targets, the decoder and
its blur). The dataset encodes with it, the model's stride sets it, the predictor (and through it the
validation during training) decodes with it, and checkpoints and ONNX files carry it.

Heatmap coordinates follow the pixel-centre convention: with stride ``r`` an input point ``x`` sits at
``u = (x + 0.5) / r - 0.5`` on the heatmap (exact, not ``x / r``), and back ``x = (u + 0.5) * r - 0.5``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fashionkp.errors import ConfigError

log = logging.getLogger(__name__)
DECODERS = ("dark", "quarter_offset", "argmax")
#: Old decoder names, accepted for one release with a warning.
DEPRECATED_DECODERS = {"seed": "quarter_offset"}


def check_decoder(name: str, key: str = "decoder") -> str:
    """A decoder's name, a deprecated alias replaced (with a warning); any other name is refused."""
    if name in DEPRECATED_DECODERS:
        log.warning("decoder=%s is deprecated: use decoder=%s", name, DEPRECATED_DECODERS[name])
        return DEPRECATED_DECODERS[name]
    if name not in DECODERS:
        raise ConfigError(key, name, "not a valid choice", DECODERS)
    return name


def input_to_heatmap(points: np.ndarray | torch.Tensor, stride: int):
    return (points + 0.5) / stride - 0.5


def heatmap_to_input(points: np.ndarray | torch.Tensor, stride: int):
    return (points + 0.5) * stride - 0.5


def gaussian_targets(points: np.ndarray, valid: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    """(K, H, W) float32 Gaussians of peak 1 centred exactly at ``points`` (K, 2) heatmap coordinates.

    Channels with ``valid`` False are all zero.
    """
    k = len(points)
    out = np.zeros((k, height, width), dtype=np.float32)
    if not valid.any():
        return out
    pts = points[valid].astype(np.float32)
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    gx = np.exp(-((xs[None, :] - pts[:, :1]) ** 2) / (2 * sigma**2))
    gy = np.exp(-((ys[None, :] - pts[:, 1:]) ** 2) / (2 * sigma**2))
    out[valid] = gy[:, :, None] * gx[:, None, :]
    return out


def gaussian_kernel(sigma: float, size: int | None = None, device=None) -> torch.Tensor:
    size = size or (2 * math.ceil(3 * sigma) + 1)
    ax = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    k = g[:, None] * g[None, :]
    return k / k.sum()


def blur(heatmaps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise blur of (N, K, H, W) heatmaps with a square kernel, borders replicated."""
    n, k, h, w = heatmaps.shape
    pad = kernel.shape[-1] // 2
    x = F.pad(heatmaps.reshape(n * k, 1, h, w), (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(x, kernel[None, None].to(heatmaps)).reshape(n, k, h, w)


def _argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k, h, w = heatmaps.shape
    score, idx = heatmaps.reshape(n, k, h * w).max(dim=2)
    coords = torch.stack([(idx % w), torch.div(idx, w, rounding_mode="floor")], dim=-1).to(heatmaps.dtype)
    return coords, score


def decode_argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer location of the maximum: (N, K, 2) heatmap coordinates and (N, K) scores."""
    return _argmax(heatmaps)


def decode_quarter_offset(heatmaps: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference CPN system's rule, kept for comparison: 5x5 Gaussian blur, full sort for the two
    largest values, a quarter-pixel step from the first toward the second, and its half-stride shift.

    That system mapped heatmap cell ``p`` to input pixel ``4 p + 2`` (stride 4); in this module's convention
    input pixel ``s p + s/2`` is heatmap coordinate ``p + 0.5 / s`` (``p + 0.125`` at stride 4).
    """
    n, k, h, w = heatmaps.shape
    smoothed = blur(heatmaps, gaussian_kernel(1.0, 5, heatmaps.device))
    flat = smoothed.reshape(n, k, h * w)
    order = flat.argsort(dim=2, descending=True)[..., :2]
    xy = torch.stack([order % w, torch.div(order, w, rounding_mode="floor")], dim=-1).to(heatmaps.dtype)
    first, second = xy[..., 0, :], xy[..., 1, :]
    step = second - first
    length = step.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    coords = first + 0.25 * step / length + 0.5 / stride
    return coords, flat.gather(2, order[..., :1]).squeeze(2)


def decode_dark(heatmaps: torch.Tensor, sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DARK (Zhang et al., CVPR 2020): blur, take the log and refine the argmax by one Newton step
    of the second-order Taylor expansion, ``-H^-1 g`` with central differences (clamped to +-1 px).

    ``sigma`` is the blur; half the target sigma is the default in the configs: a blur as wide as the
    target (the paper's choice) biases peaks within two sigmas of the border by up to a pixel (the
    replicated border joins the blur), while half of it keeps noise-free error below 0.01 px and most
    of the noise suppression (benchmarks/bench_decoding.py)."""
    n, k, h, w = heatmaps.shape
    coords, score = _argmax(heatmaps)
    smoothed = blur(heatmaps, gaussian_kernel(sigma, device=heatmaps.device)) if sigma > 0 else heatmaps
    logs = smoothed.clamp_min(1e-10).log()
    padded = F.pad(logs, (2, 2, 2, 2), mode="replicate").reshape(n, k, -1)
    pw = w + 4
    cx = coords[..., 0].long() + 2
    cy = coords[..., 1].long() + 2

    def at(dx: int, dy: int) -> torch.Tensor:
        return padded.gather(2, ((cy + dy) * pw + (cx + dx)).unsqueeze(2)).squeeze(2)

    c = at(0, 0)
    dx = 0.5 * (at(1, 0) - at(-1, 0))
    dy = 0.5 * (at(0, 1) - at(0, -1))
    dxx = at(1, 0) - 2 * c + at(-1, 0)
    dyy = at(0, 1) - 2 * c + at(0, -1)
    dxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
    det = dxx * dyy - dxy * dxy
    ok = (det.abs() > 1e-12) & (dxx < 0) & (dyy < 0)
    safe_det = torch.where(ok, det, torch.ones_like(det))
    ox = -(dyy * dx - dxy * dy) / safe_det
    oy = -(dxx * dy - dxy * dx) / safe_det
    offset = torch.stack([ox, oy], dim=-1).clamp(-1.0, 1.0) * ok.unsqueeze(-1)
    return coords + offset, score


def decode_peaks(
    heatmaps: torch.Tensor, method: str, sigma: float, stride: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (N, K, H, W) heatmaps into (N, K, 2) heatmap coordinates and (N, K) peak scores."""
    if method == "dark":
        return decode_dark(heatmaps, sigma)
    if method == "quarter_offset":
        return decode_quarter_offset(heatmaps, stride)
    if method == "argmax":
        return decode_argmax(heatmaps)
    raise ValueError(f"unknown decoder {method!r}; expected one of {', '.join(DECODERS)}")


def flip_back(heatmaps: torch.Tensor, permutation: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Heatmaps of a horizontally flipped input, mirrored back with left/right channels swapped.

    Mirroring the heatmap grid is exact in the pixel-centre convention: input ``x -> W - 1 - x`` is
    heatmap ``u -> W/stride - 1 - u``, so no shift is needed.
    """
    return heatmaps.flip(-1)[:, list(permutation)]


@dataclass(frozen=True)
class HeatmapCodec:
    """Points in input pixels <-> heatmaps at ``stride`` (the model's finest feature map, asked of it).

    ``encode`` makes the training targets of one sample; ``decode`` turns a batch of predicted heatmaps
    back into input pixels. Everything that moves between the two spaces goes through one codec, so the
    dataset, the model, the predictor and an exported file cannot disagree on the convention.
    """

    #: Input pixels per heatmap pixel.
    stride: int
    #: Gaussian sigma of the RefineNet targets, in heatmap pixels.
    sigma: float
    #: Gaussian sigma of the GlobalNet targets (every pyramid level), in heatmap pixels.
    global_sigma: float
    #: ``dark`` | ``quarter_offset`` | ``argmax``.
    decoder: str
    #: Blur of the DARK decoder, in heatmap pixels.
    decode_sigma: float
    #: Occluded points (v=0) carry a known position; the official metric counts them, so they are targets.
    include_occluded: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", check_decoder(self.decoder, "heatmap.decoder"))

    def config(self) -> dict:
        """Plain values, for checkpoints and ONNX metadata (``HeatmapCodec(**codec.config())`` rebuilds it)."""
        return asdict(self)

    def to_heatmap(self, points):
        return input_to_heatmap(points, self.stride)

    def to_input(self, points):
        return heatmap_to_input(points, self.stride)

    def encode(self, points: np.ndarray, visibility: np.ndarray, input_size: int) -> dict[str, np.ndarray]:
        """Targets of one sample: ``points`` (K, 2) in input pixels and ``visibility`` (K,) as FashionAI's
        v (1 visible, 0 occluded, -1 absent or outside the input).

        Returns ``target`` (K, S, S) and ``weight`` (K,), and ``target_global`` when the GlobalNet sigma
        differs; S is ``input_size / stride``.
        """
        size = input_size // self.stride
        valid = visibility >= (0 if self.include_occluded else 1)
        centres = self.to_heatmap(points)
        out = {"target": gaussian_targets(centres, valid, size, size, self.sigma), "weight": valid.astype(np.float32)}
        if self.global_sigma != self.sigma:
            out["target_global"] = gaussian_targets(centres, valid, size, size, self.global_sigma)
        return out

    def decode(self, heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K, H, W) heatmaps -> (N, K, 2) input pixels (float64) and (N, K) peak scores.

        Always in fp32, even under bf16 autocast: DARK's log and Taylor step are sub-pixel arithmetic.
        """
        with torch.autocast(heatmaps.device.type, enabled=False):
            coords, scores = decode_peaks(heatmaps.float(), self.decoder, self.decode_sigma, self.stride)
        return self.to_input(coords.double()), scores.float()
