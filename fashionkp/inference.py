"""Trained models on images: checkpoint loading, ensembles, flip and multi-scale test, decoding to
original pixels. The Python API for people who embed fashionkp:

    predictor = KeypointPredictor(["dress.ckpt", "all.ckpt"])
    points = predictor.predict("photo.jpg", "dress")   # (24, 3): x, y, score in original pixels
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fashionkp.checks import BACKENDS, as_list, check_inference_config
from fashionkp.errors import ConfigError, UserError
from fashionkp.heatmaps import DECODERS, decode, flip_back, to_image_points
from fashionkp.images import ImageReadError, load_image, to_rgb8
from fashionkp.keypoints import (
    ALL,
    CATEGORIES,
    CATEGORY_KEYPOINTS,
    NUM_KEYPOINTS,
    channels_for,
    check_category,
    flip_permutation,
)
from fashionkp.transforms import letterbox_matrix, warp_image

log = logging.getLogger(__name__)
STRIDE = 4
#: Where a photo that cannot be read is given its points when no model knows its training mean shape: the
#: centre of a 512-pixel FashionAI photo.
UNKNOWN_SHAPE_POINT = 255.5


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


class GarmentTypeError(UserError, ValueError):
    """A garment type that none of the models was trained for."""


def load_module(path: Path | str, map_location: str | torch.device = "cpu"):
    """A CPNModule from a Lightning checkpoint, without downloading backbone weights again."""
    from fashionkp.module import CPNModule

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated or not a checkpoint): {e}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path}: not a fashionkp training checkpoint (no state_dict/hyper_parameters)")
    hparams = dict(ckpt["hyper_parameters"])
    hparams["backbone"] = {**hparams["backbone"], "pretrained": False, "weights": None}
    module = CPNModule(**hparams)
    # torch.compile wraps modules as `_orig_mod`; such checkpoints load into the plain model too.
    state = {k.replace("._orig_mod", "").replace("_orig_mod.", ""): v for k, v in ckpt["state_dict"].items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the model its hyper-parameters describe: {e}") from e
    # (5, 24, 2) training mean shape per garment type (checkpoints from before it was saved have none)
    module.mean_shape = np.asarray(ckpt["mean_shape"], dtype=np.float64) if "mean_shape" in ckpt else None
    return module.eval()


class TorchHeatmapRunner:
    """Runs one checkpoint's model: (N, 3, S, S) uint8 -> (N, K, S/4, S/4) heatmaps."""

    def __init__(self, path: Path | str, device: torch.device, channels_last: bool = False) -> None:
        self.module = load_module(path).to(device)
        self.device = device
        self.path = str(path)
        hp = self.module.hparams
        self.clothes, self.input_size, self.decode_sigma = hp.clothes, hp.input_size, hp.decode_sigma
        self.mean_shape = self.module.mean_shape
        self.channels_last = channels_last
        if channels_last:
            self.module.model.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images).to(self.device).float()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module.model(x).refine_heatmaps.float()


class OnnxHeatmapRunner:
    """The same interface over an exported ``.onnx`` file, through onnxruntime."""

    def __init__(self, path: Path | str, threads: int = 0) -> None:
        import json

        import onnx
        import onnxruntime as ort

        self.path = str(path)
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "fashionkp" not in meta:
            raise CheckpointError(f"{path}: not an ONNX file exported by `fashionkp export` (no metadata)")
        info = json.loads(meta["fashionkp"])
        self.clothes, self.input_size, self.decode_sigma = info["clothes"], info["input_size"], info["decode_sigma"]
        self.mean_shape = np.asarray(info["mean_shape"], dtype=np.float64) if info.get("mean_shape") else None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.device = torch.device("cpu")

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        out = self.session.run(None, {"images": images.astype(np.float32)})[0]
        return torch.from_numpy(out)


@dataclass
class Member:
    runner: TorchHeatmapRunner | OnnxHeatmapRunner
    weight: float


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cached_onnx(checkpoint: Path | str, cache_dir: Path | None = None) -> Path:
    """The ONNX export of a checkpoint, made once and kept (keyed by the file's path, size and time)."""
    from fashionkp.export import export_onnx

    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    stat = checkpoint.stat()
    key = hashlib.sha1(f"{checkpoint}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_dir = cache_dir or Path(torch.hub.get_dir()) / "fashionkp" / "onnx"
    target = cache_dir / f"{checkpoint.stem}-{key}.onnx"
    if not target.is_file():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        export_onnx(checkpoint, tmp)
        os.replace(tmp, target)
    return target


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class KeypointPredictor:
    """One or more models (an ensemble), each image routed to the models of its garment type.

    Heatmaps of all members are brought to one grid (the finest member's) and averaged with the
    members' weights; a ``clothes=all`` model serves every category. Models may differ in backbone and
    input size: the top-left letterbox frame is the same square at every size, so the grids align.
    """

    def __init__(
        self,
        checkpoints: Sequence[Path | str],
        weights: Sequence[float] | None = None,
        device: str = "auto",
        flip_test: bool = True,
        scales: Sequence[float] = (1.0,),
        decoder: str = "dark",
        decode_sigma: float | None = None,
        channels_last: bool | None = None,
        onnx_threads: int = 0,
        backend: str = "auto",
    ) -> None:
        checkpoints = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        if not checkpoints:
            raise ConfigError("checkpoints", [], "no checkpoint given")
        if decoder not in DECODERS:
            raise ConfigError("decoder", decoder, "not a valid choice", DECODERS)
        weights = list(weights) if weights else [1.0] * len(checkpoints)
        if len(weights) != len(checkpoints):
            raise ConfigError("weights", weights, f"{len(weights)} ensemble weights for {len(checkpoints)} checkpoints")
        if backend not in BACKENDS:
            raise ConfigError("backend", backend, "not a valid choice", BACKENDS)
        self.device = _device(device)
        # On CPU onnxruntime is the fastest path, then channels_last PyTorch (benchmarks/bench_inference.py);
        # on GPU PyTorch with cudnn's own layout.
        use_onnx = backend == "onnx" or (backend == "auto" and self.device.type == "cpu" and _has_onnxruntime())
        channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.members: list[Member] = []
        for path, weight in zip(checkpoints, weights, strict=True):
            if str(path).endswith(".onnx"):
                runner = OnnxHeatmapRunner(path, onnx_threads)
            elif use_onnx:
                runner = OnnxHeatmapRunner(cached_onnx(path), onnx_threads)
            else:
                runner = TorchHeatmapRunner(path, self.device, channels_last)
            self.members.append(Member(runner, float(weight)))
        self.flip_test, self.scales, self.decoder = flip_test, tuple(scales), decoder
        self.decode_sigma = decode_sigma

    @property
    def categories(self) -> list[str]:
        """Garment types this predictor can handle."""
        kinds = {m.runner.clothes for m in self.members}
        return [c for c in CATEGORY_KEYPOINTS if ALL in kinds or c in kinds]

    def members_for(self, category: str) -> list[Member]:
        check_category(category)
        members = [m for m in self.members if m.runner.clothes in (category, ALL)]
        if not members:
            trained = sorted({m.runner.clothes for m in self.members})
            raise GarmentTypeError(
                f"no model for garment type {category!r}: the checkpoints were trained for {trained}"
            )
        return members

    def _member_heatmaps(self, member: Member, images: list[np.ndarray], grid: int) -> torch.Tensor:
        """(N, 24, grid, grid) heatmaps of one member, averaged over scales and flips."""
        runner = member.runner
        channels = list(channels_for(runner.clothes))
        total = None
        for scale in self.scales:
            size = max(32, int(round(runner.input_size * scale / 32)) * 32)
            batch = np.stack([warp_image(img, letterbox_matrix(*img.shape[:2], size), size) for img in images])
            batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
            heatmaps = runner(batch)
            if self.flip_test:
                mirrored = runner(np.ascontiguousarray(batch[..., ::-1]))
                heatmaps = 0.5 * (heatmaps + flip_back(mirrored, flip_permutation(runner.clothes)))
            if heatmaps.shape[-1] != grid:
                heatmaps = F.interpolate(heatmaps, size=(grid, grid), mode="bilinear", align_corners=False)
            total = heatmaps if total is None else total + heatmaps
        full = torch.zeros(len(images), NUM_KEYPOINTS, grid, grid, device=total.device)
        full[:, channels] = total / len(self.scales)
        return full.cpu()

    def predict_batch(self, images: Sequence[np.ndarray], categories: Sequence[str]) -> np.ndarray:
        """(N, 24, 3) x, y, score in original pixels; NaN outside each image's category."""
        images = [to_rgb8(img) for img in images]
        out = np.full((len(images), NUM_KEYPOINTS, 3), np.nan)
        for category in dict.fromkeys(categories):
            idx = [i for i, c in enumerate(categories) if c == category]
            members = self.members_for(category)
            finest = max(members, key=lambda m: m.runner.input_size)
            grid = int(round(finest.runner.input_size * max(self.scales) / 32)) * 32 // STRIDE
            # The decoding blur is in heatmap pixels of the grid decoded on: the finest member's.
            sigma = self.decode_sigma or finest.runner.decode_sigma
            subset = [images[i] for i in idx]
            heatmaps = sum(m.weight * self._member_heatmaps(m, subset, grid) for m in members)
            heatmaps = heatmaps / sum(m.weight for m in members)
            own = list(CATEGORY_KEYPOINTS[category])
            coords, scores = decode(heatmaps[:, own], self.decoder, sigma)
            matrices = np.stack([letterbox_matrix(*images[i].shape[:2], grid * STRIDE) for i in idx])
            points = to_image_points(coords, matrices, STRIDE)
            for row, i in enumerate(idx):
                h, w = images[i].shape[:2]
                xy = points[row]
                xy[:, 0] = np.clip(xy[:, 0], 0, w - 1)
                xy[:, 1] = np.clip(xy[:, 1], 0, h - 1)
                out[i, own, :2] = xy
                out[i, own, 2] = scores[row].numpy()
        return out

    def fallback_points(self, category: str) -> np.ndarray:
        """(24, 2) points for a photo that cannot be read: the mean shape of the category's training photos
        (from the first model that recorded it), so that a submission still has a row for every image."""
        index = CATEGORIES.index(check_category(category))
        for member in self.members_for(category):
            if member.runner.mean_shape is not None:
                return np.nan_to_num(member.runner.mean_shape[index], nan=UNKNOWN_SHAPE_POINT)
        return np.full((NUM_KEYPOINTS, 2), UNKNOWN_SHAPE_POINT)

    def predict(self, image: np.ndarray | Path | str, category: str) -> np.ndarray:
        """(24, 3) x, y, score for one image (array in RGB, or a path); NaN outside its category."""
        array = load_image(image) if isinstance(image, (str, Path)) else image
        return self.predict_batch([array], [category])[0]


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, load_image(self.paths[i]), None
        except ImageReadError as e:
            return i, None, str(e)


def run_on_files(
    predictor: KeypointPredictor,
    paths: Sequence[Path],
    categories: Sequence[str],
    batch_size: int = 8,
    num_workers: int = 2,
    progress: bool = True,
) -> tuple[np.ndarray, list[str], list[tuple[int, int]]]:
    """Predict every image; unreadable ones are reported and skipped, never fatal.

    Returns (N, 24, 3) points (NaN rows for failed images), the failure messages and each image's (h, w).
    """
    out = np.full((len(paths), NUM_KEYPOINTS, 3), np.nan)
    sizes: list[tuple[int, int]] = [(0, 0)] * len(paths)
    failures: list[str] = []
    loader = DataLoader(_ImageFiles(paths), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        good = [(i, img) for i, img, err in batch if img is not None]
        for _, _, err in batch:
            if err:
                failures.append(err)
                log.warning("skipped: %s", err)
        if good:
            idx = [i for i, _ in good]
            out[idx] = predictor.predict_batch([img for _, img in good], [categories[i] for i in idx])
            for i, img in good:
                sizes[i] = img.shape[:2]
    return out, failures, sizes


def predictor_from_cfg(cfg: DictConfig) -> KeypointPredictor:
    """The predictor that predict.py and evaluate.py configs describe (checked first: one clear line on a typo)."""
    check_inference_config(cfg)
    return KeypointPredictor(
        as_list(cfg.checkpoints), weights=as_list(cfg.get("weights")) or None, device=cfg.device,
        flip_test=cfg.flip_test, scales=as_list(cfg.scales), decoder=cfg.decoder,
        channels_last=cfg.get("channels_last"), backend=cfg.get("backend", "auto"),
    )  # fmt: skip
