"""Heatmap codec: Gaussian targets with sub-pixel centres, and decoders (DARK, the seed rule, argmax).

Heatmap coordinates follow the pixel-centre convention: with stride ``r`` an input point ``x`` sits at
``u = (x + 0.5) / r - 0.5`` on the heatmap (exact, not ``x / r``), and back ``x = (u + 0.5) * r - 0.5``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DECODERS = ("dark", "seed", "argmax")


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


def decode_seed(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed system's rule, kept for comparison: 5x5 Gaussian blur, full sort for the two largest
    values, a quarter-pixel step from the first toward the second, and its ``+2`` input-pixel shift.

    The seed mapped heatmap cell ``p`` to input pixel ``4 p + 2``; in this module's convention that
    input pixel is heatmap coordinate ``p + 0.125``, which is what is returned (at stride 4).
    """
    n, k, h, w = heatmaps.shape
    smoothed = blur(heatmaps, gaussian_kernel(1.0, 5, heatmaps.device))
    flat = smoothed.reshape(n, k, h * w)
    order = flat.argsort(dim=2, descending=True)[..., :2]
    xy = torch.stack([order % w, torch.div(order, w, rounding_mode="floor")], dim=-1).to(heatmaps.dtype)
    first, second = xy[..., 0, :], xy[..., 1, :]
    step = second - first
    length = step.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    coords = first + 0.25 * step / length + 0.125
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


def decode(heatmaps: torch.Tensor, method: str = "dark", sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (N, K, H, W) heatmaps into (N, K, 2) heatmap coordinates and (N, K) peak scores."""
    if method == "dark":
        return decode_dark(heatmaps, sigma)
    if method == "seed":
        return decode_seed(heatmaps)
    if method == "argmax":
        return decode_argmax(heatmaps)
    raise ValueError(f"unknown decoder {method!r}; expected one of {', '.join(DECODERS)}")


def flip_back(heatmaps: torch.Tensor, permutation: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Heatmaps of a horizontally flipped input, mirrored back with left/right channels swapped.

    Mirroring the heatmap grid is exact in the pixel-centre convention: input ``x -> W - 1 - x`` is
    heatmap ``u -> W/stride - 1 - u``, so no shift is needed.
    """
    return heatmaps.flip(-1)[:, list(permutation)]


def to_image_points(coords: torch.Tensor | np.ndarray, matrices: np.ndarray, stride: int) -> np.ndarray:
    """(N, K, 2) heatmap coordinates -> original-image pixels through each sample's inverse affine."""
    coords = coords.detach().cpu().double().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
    points = heatmap_to_input(coords, stride)
    matrices = np.asarray(matrices, dtype=np.float64)
    full = np.concatenate([matrices, np.broadcast_to([0.0, 0.0, 1.0], (len(matrices), 1, 3))], axis=1)
    inverse = np.linalg.inv(full)[:, :2]
    return np.einsum("nij,nkj->nki", inverse[:, :, :2], points) + inverse[:, None, :, 2]
