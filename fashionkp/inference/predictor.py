"""Trained models on images: ensembles, flip and multi-scale test, decoding to original pixels. This is the
one prediction path: ``predict.py``, ``evaluate.py`` and the validation during training all call
:meth:`KeypointPredictor.predict_letterboxed`. The Python API for people who embed fashionkp:

    predictor = KeypointPredictor(["dress.ckpt", "all.ckpt"])
    points = predictor.predict("photo.jpg", "dress")   # (24, 3): x, y, score in original pixels
    result = predictor.predict_photos([image], [None])  # the garment type told by a clothes=all model's head
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fashionkp.checks import BACKENDS, check_inference_config
from fashionkp.config import as_list
from fashionkp.data.codec import HeatmapCodec, check_decoder, flip_back
from fashionkp.data.images import ImageReadError, load_image, to_rgb8
from fashionkp.data.keypoints import (
    ALL,
    CATEGORIES,
    CATEGORY_ID,
    CATEGORY_KEYPOINTS,
    NUM_KEYPOINTS,
    channels_for,
    check_category,
    flip_permutation,
)
from fashionkp.data.transforms import (
    apply_affine,
    check_crop_margin,
    check_crop_passes,
    crop_frame,
    frame_matrix,
    input_size_at,
    invert_affine,
    letterbox_frame,
    warp_image,
)
from fashionkp.errors import ConfigError, UserError
from fashionkp.inference.checkpoint import (
    DEFAULT_TEST_SCALES,
    CheckpointError,
    TrainedModel,
    build_codec,
    crop_passes_of,
    load_checkpoint,
    test_scales_of,
    upgrade_hparams,
)
from fashionkp.inference.export import EXPORT_FORMAT, export_onnx
from fashionkp.inference.precision import (
    INT8_SCHEME,
    PRECISION_CHOICES,
    calibration_photos,
    cpu_features,
    describe_choice,
    quantize_int8,
    read_info,
    recorded_choice,
    recorded_int8_file,
    usable,
)
from fashionkp.models import CPNOutput

log = logging.getLogger(__name__)
#: The crop pass's margin (a fraction of the box's side) for models trained without a recorded one.
DEFAULT_CROP_MARGIN = 0.15
#: Where a photo that cannot be read is given its points when no model knows its training mean shape: the
#: centre of a 512-pixel FashionAI photo.
UNKNOWN_SHAPE_POINT = 255.5


class GarmentTypeError(UserError, ValueError):
    """A garment type that none of the models was trained for."""


class TorchHeatmapRunner:
    """Runs one trained network: (N, 3, S, S) RGB pixels (uint8 array or tensor) -> (N, K, S/s, S/s) fp32
    RefineNet heatmaps and, for a model with a type head, (N, 5) garment-type probabilities (else None).
    ``device=None`` leaves the network where it is (validation during training); ``bf16`` runs it under bf16
    autocast (the outputs come back in fp32)."""

    def __init__(
        self,
        trained: TrainedModel,
        device: torch.device | None = None,
        channels_last: bool = False,
        bf16: bool = False,
    ) -> None:
        self.model = trained.model if device is None else trained.model.to(device)
        self.device = device
        self.clothes, self.input_size, self.codec = trained.clothes, trained.input_size, trained.codec
        self.mean_shape, self.path, self.crop_margin = trained.mean_shape, trained.path, trained.crop_margin
        self.scales, self.crop_passes = trained.scales, trained.crop_passes
        self.has_type_head = trained.model.type_head is not None
        #: whether the network is told each photo's garment type (``model.garment_type_input``)
        self.takes_types = trained.model.type_input is not None
        self.channels_last, self.bf16 = channels_last, bf16
        self.precision = "bf16" if bf16 else "fp32"
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: Path | str, device: torch.device, channels_last: bool = False, bf16: bool = False):
        return cls(load_checkpoint(path), device, channels_last, bf16)

    def network(self, x: torch.Tensor, types: torch.Tensor | None) -> CPNOutput:
        return self.model(x, types)

    @torch.inference_mode()
    def __call__(
        self, images: np.ndarray | torch.Tensor, types: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``types``: (N,) garment-type indices (CATEGORIES order), for a network that takes them."""
        # without a device of its own (validation), the network's: a crop pass's inputs come from the CPU
        device = self.device or next(self.model.parameters()).device
        x = torch.as_tensor(images).to(device).float()
        told = None if types is None else torch.as_tensor(types, device=device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # fp32 unless told bf16, even inside the autocast of training's bf16-mixed: the val/ne that selects
        # checkpoints is then the deployed fp32 predictor's, the NE evaluate.py gives.
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.network(x, told)
        # fp32 from here on: under bf16 autocast the flip average would otherwise round in bf16 too
        probabilities = None if output.type_logits is None else output.type_logits.float().softmax(dim=1)
        return output.refine_heatmaps.float(), probabilities


class OnnxHeatmapRunner:
    """The same interface over an exported ``.onnx`` file, through onnxruntime."""

    def __init__(self, path: Path | str, threads: int = 0) -> None:
        import onnx
        import onnxruntime as ort

        self.path = str(path)
        info = read_info(onnx.load(str(path), load_external_data=False))
        if not info:
            raise CheckpointError(f"{path}: not an ONNX file exported by `fashionkp export` (no metadata)")
        self.clothes, self.input_size = info["clothes"], info["input_size"]
        self.precision = info.get("precision", "fp32")
        # files exported before the codec was one object hold only the decoding blur; their stride was 4
        codec = info.get("codec") or upgrade_hparams(info)["codec"]
        self.codec = build_codec(codec, codec.get("stride", 4))
        self.mean_shape = np.asarray(info["mean_shape"], dtype=np.float64) if info.get("mean_shape") else None
        self.crop_margin = info.get("crop_margin")
        self.crop_passes = crop_passes_of(info)
        self.scales = test_scales_of(info)
        if info.get("precision_choice"):
            log.info("%s: %s", Path(path).name, describe_choice(info["precision_choice"], self.precision))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.has_type_head = len(self.session.get_outputs()) > 1
        self.takes_types = "types" in [i.name for i in self.session.get_inputs()]
        self.device = torch.device("cpu")

    def __call__(
        self, images: np.ndarray | torch.Tensor, types: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        images = images.cpu().numpy() if isinstance(images, torch.Tensor) else images
        feed = {"images": images.astype(np.float32)}
        if self.takes_types:
            if types is None:
                raise ValueError(f"{self.path}: the network takes each photo's garment type (model.garment_type_input)")
            feed["types"] = np.asarray(types, dtype=np.int64)
        outputs = self.session.run(None, feed)
        return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1]) if self.has_type_head else None


HeatmapRunner = TorchHeatmapRunner | OnnxHeatmapRunner


def takes_types(runner: HeatmapRunner) -> bool:
    """Whether a runner's network is told each photo's garment type (runners made elsewhere are not)."""
    return getattr(runner, "takes_types", False)


@dataclass
class Member:
    runner: HeatmapRunner
    weight: float
    #: the file as the caller named it (``<training>`` for a network in memory)
    name: str


@dataclass
class _MemberOutput:
    """What one member said of the photos ``index`` of a batch."""

    index: list[int]
    heatmaps: torch.Tensor
    types: np.ndarray | None


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cached_onnx(
    checkpoint: Path | str, cache_dir: Path | None = None, int8_calibration: Sequence[Path | str] = ()
) -> Path:
    """The ONNX export of a checkpoint, made once and kept (keyed by the file's path, size and time); int8
    when calibration photos are given (keyed by them too)."""
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    stat = checkpoint.stat()
    # EXPORT_FORMAT: files cached by an older fashionkp are made again, not read with new expectations
    key = hashlib.sha1(f"{checkpoint}:{stat.st_size}:{stat.st_mtime_ns}:{EXPORT_FORMAT}".encode()).hexdigest()[:16]
    cache_dir = cache_dir or Path(torch.hub.get_dir()) / "fashionkp" / "onnx"
    target = cache_dir / f"{checkpoint.stem}-{key}.onnx"
    if not target.is_file():
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        export_onnx(checkpoint, tmp)
        os.replace(tmp, target)
    if not int8_calibration:
        return target
    photos = sorted(str(p) for p in int8_calibration)
    calibration_key = hashlib.sha1("\n".join([*photos, f"int8 scheme {INT8_SCHEME}"]).encode()).hexdigest()[:12]
    quantized = cache_dir / f"{checkpoint.stem}-{key}-int8-{calibration_key}.onnx"
    if not quantized.is_file():
        log.info("int8: calibrating %s on %d photos", checkpoint.name, len(photos))
        quantize_int8(target, quantized, photos)
    return quantized


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class PhotoBatch:
    """A batch of photos as model inputs: each photo seen through a square frame (by default its letterbox:
    the photo scaled into the top-left of the square, see ``letterbox_frame``; in the crop pass, a square
    around the garment), warped to any input size.

    Built from photos (warped once per input size and kept), or from inputs already letterboxed at one size
    (the validation batches of training, which the dataset warps with the same matrix), with the photos
    themselves when a crop pass will need them.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        images: Sequence[np.ndarray] | None = None,
        frames: Sequence[tuple[float, float, float]] | None = None,
    ) -> None:
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.images = images
        self.frames = list(frames) if frames is not None else [letterbox_frame(h, w) for h, w in self.sizes]
        self._inputs: dict[int, np.ndarray | torch.Tensor] = {}

    @classmethod
    def from_images(cls, images: Sequence[np.ndarray]) -> PhotoBatch:
        images = [to_rgb8(img) for img in images]
        return cls([img.shape[:2] for img in images], images)

    @classmethod
    def from_inputs(
        cls, inputs: torch.Tensor, sizes: Sequence[tuple[int, int]], images: Sequence[np.ndarray] | None = None
    ) -> PhotoBatch:
        """(N, 3, S, S) inputs already letterboxed (``letterbox_matrix``) from photos of ``sizes`` (h, w)."""
        batch = cls(sizes, images)
        batch._inputs[int(inputs.shape[-1])] = inputs
        return batch

    def reframed(self, frames: Sequence[tuple[float, float, float]]) -> PhotoBatch:
        """The same photos seen through other frames (left, top, side in photo pixels)."""
        if self.images is None:
            raise ValueError("a crop pass needs the photos, not only their letterboxed inputs")
        return PhotoBatch(self.sizes, self.images, frames)

    def __len__(self) -> int:
        return len(self.sizes)

    def at(self, size: int, index: Sequence[int]) -> np.ndarray | torch.Tensor:
        """(len(index), 3, size, size) inputs of the photos ``index``."""
        if size not in self._inputs:
            if self.images is None:
                raise ValueError(f"inputs were given at {list(self._inputs)} pixels only, not at {size}")
            frames = zip(self.images, self.frames, strict=True)
            batch = np.stack([warp_image(img, frame_matrix(frame, size), size) for img, frame in frames])
            self._inputs[size] = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        return self._inputs[size][list(index)]

    def to_photo(self, points: np.ndarray, input_size: int, index: Sequence[int]) -> np.ndarray:
        """(n, K, 2) points in input pixels -> each photo's pixels, clipped to the photo."""
        out = np.empty_like(points)
        for row, i in enumerate(index):
            h, w = self.sizes[i]
            out[row] = apply_affine(points[row], invert_affine(frame_matrix(self.frames[i], input_size)))
            out[row, :, 0] = np.clip(out[row, :, 0], 0, w - 1)
            out[row, :, 1] = np.clip(out[row, :, 1], 0, h - 1)
        return out


@dataclass
class Predictions:
    """What the predictor says of a batch of photos."""

    #: (N, 24, 3) x, y, score in each photo's pixels; NaN outside its garment type.
    points: np.ndarray
    #: The garment type of each photo: given, or told by the models' type heads.
    categories: list[str]
    #: (N, 5) garment-type probabilities (``CATEGORIES`` order) of the type heads, averaged over an ensemble;
    #: None when no model has a type head (NaN rows for photos no head saw).
    type_probabilities: np.ndarray | None
    #: True where the type came from the type heads, not from the caller.
    predicted: list[bool]


def _mirror(inputs: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    return inputs.flip(-1) if isinstance(inputs, torch.Tensor) else np.ascontiguousarray(inputs[..., ::-1])


class KeypointPredictor:
    """One or more models (an ensemble), each image routed to the models of its garment type.

    Heatmaps of all members are brought to one grid (the finest member's) and averaged with the
    members' weights; a ``clothes=all`` model serves every category. Models may differ in backbone and
    input size: the top-left letterbox frame is the same square at every size, so the grids align.
    ``checkpoints`` are files (``.ckpt`` or exported ``.onnx``) or runners of models already in memory.
    ``scales``: test scales, by default those the first model was trained to be predicted at
    (``model.test_scales``). ``decoder`` and ``decode_sigma`` replace the models' own codec settings when given.
    ``fine_checkpoints`` (with ``fine_weights``): dedicated models for the crop pass; without them the crop pass
    runs ``checkpoints``. ``crop_passes``: how many crop passes (each around the previous one's points, their points
    averaged), by default as the first model was trained (``model.crop_passes``).
    """

    def __init__(
        self,
        checkpoints: Sequence[Path | str | HeatmapRunner] | Path | str,
        weights: Sequence[float] | None = None,
        device: str = "auto",
        flip_test: bool = True,
        scales: Sequence[float] | None = None,
        decoder: str | None = None,
        decode_sigma: float | None = None,
        channels_last: bool | None = None,
        onnx_threads: int = 0,
        backend: str = "auto",
        precision: str = "auto",
        calibration: Sequence[Path | str] = (),
        two_pass: bool | None = None,
        crop_margin: float | None = None,
        crop_scales: Sequence[float] | None = None,
        crop_passes: int | None = None,
        fine_checkpoints: Sequence[Path | str | HeatmapRunner] | Path | str | None = None,
        fine_weights: Sequence[float] | None = None,
    ) -> None:
        checkpoints = as_list(checkpoints)
        if not checkpoints:
            raise ConfigError("checkpoints", [], "no checkpoint given")
        decoder = None if decoder is None else check_decoder(decoder)
        if backend not in BACKENDS:
            raise ConfigError("backend", backend, "not a valid choice", BACKENDS)
        if precision not in PRECISION_CHOICES:
            raise ConfigError("precision", precision, "not a valid choice", PRECISION_CHOICES)
        self.device = _device(device)
        if self.device.type == "cpu" and any(
            isinstance(c, (str, Path)) for c in [*checkpoints, *as_list(fine_checkpoints)]
        ):
            # what bf16 and int8 can use here, said on every run (not by validation inside training)
            log.info("CPU: %s", cpu_features().describe())
        # On CPU onnxruntime is the fastest path, then channels_last PyTorch (benchmarks/bench_inference.py);
        # on GPU PyTorch with cudnn's own layout.
        use_onnx = backend == "onnx" or (backend == "auto" and self.device.type == "cpu" and _has_onnxruntime())
        channels_last = self.device.type == "cpu" if channels_last is None else channels_last

        def load(key: str, items: list, weights: Sequence[float] | None) -> list[Member]:
            weights = list(weights) if weights else [1.0] * len(items)
            if len(weights) != len(items):
                raise ConfigError(key.replace("checkpoints", "weights"), weights,
                                  f"{len(weights)} ensemble weights for {len(items)} checkpoints")  # fmt: skip
            members = []
            for item, weight in zip(items, weights, strict=True):
                if not isinstance(item, (str, Path)):
                    runner = item  # a runner of a model already in memory
                elif str(item).endswith(".onnx"):
                    runner = OnnxHeatmapRunner(item, onnx_threads)  # runs in the precision it was exported in
                else:
                    chosen = usable(self._precision_of(item, precision), self.device.type)
                    if chosen == "int8":
                        runner = OnnxHeatmapRunner(self._int8_file(item, calibration), onnx_threads)
                    elif chosen == "fp32" and use_onnx:
                        runner = OnnxHeatmapRunner(cached_onnx(item), onnx_threads)
                    else:
                        runner = TorchHeatmapRunner.from_checkpoint(item, self.device, channels_last, chosen == "bf16")
                name = Path(item).name if isinstance(item, (str, Path)) else Path(runner.path).name
                members.append(Member(runner, float(weight), name))
            return members

        self.members = load("checkpoints", checkpoints, weights)
        #: The crop pass's models: dedicated fine models where given, else the first pass's.
        self.fine_members = load("fine_checkpoints", as_list(fine_checkpoints), fine_weights) or self.members
        self.flip_test = flip_test
        #: The test scales: as the first pass's first model was trained to be predicted unless told.
        self.scales = tuple(scales) if scales is not None else self._trained_scales(self.members[0])
        if scales is None and len({self._trained_scales(m) for m in [*self.members, *self.fine_members]}) > 1:
            log.warning("the models were trained with different test scales: all run at the first one's, %s "
                        "(scales= sets them)", list(self.scales))  # fmt: skip
        #: The crop pass's test scales (the first pass's unless told): above 1 it sees the garment larger.
        self.crop_scales = tuple(crop_scales) if crop_scales else self.scales
        self.decoder, self.decode_sigma = decoder, decode_sigma
        #: The crop pass's margin, None for one pass: as the models were trained unless told otherwise.
        self.crop_margin = self._crop_margin(two_pass, crop_margin)
        #: How many crop passes follow the first (none without a crop margin).
        self.crop_passes = self._crop_passes(crop_passes) if self.crop_margin is not None else 0
        if crop_scales and self.crop_margin is None:
            log.warning("crop_scales=%s: ignored, the models run one pass (two_pass=true adds the crop pass)",
                        list(crop_scales))  # fmt: skip
        if crop_passes is not None and self.crop_margin is None:
            log.warning("crop_passes=%s: ignored, the models run one pass (two_pass=true adds the crop passes)",
                        crop_passes)  # fmt: skip
        if self.fine_members is not self.members:
            if self.crop_margin is None:
                raise ConfigError("fine_checkpoints", self.model_names_of(self.fine_members),
                                  "dedicated crop-pass models need the crop pass", "two_pass=true")  # fmt: skip
            missing = [c for c in self.categories if c not in self._categories_of(self.fine_members)]
            if missing:
                raise ConfigError("fine_checkpoints", self.model_names_of(self.fine_members),
                                  f"no crop-pass model for {missing}, which checkpoints serve")  # fmt: skip

    @staticmethod
    def _trained_scales(member: Member) -> tuple[float, ...]:
        # runners of models in memory that predate model.test_scales were used at one scale
        return getattr(member.runner, "scales", DEFAULT_TEST_SCALES)

    def _crop_margin(self, two_pass: bool | None, crop_margin: float | None) -> float | None:
        members = [*self.members, *self.fine_members]  # the first pass's training says it first
        trained = [m.runner.crop_margin for m in members if m.runner.crop_margin is not None]
        if two_pass is None:
            two_pass = bool(trained)
        if not two_pass:
            return None
        margin = crop_margin if crop_margin is not None else (trained[0] if trained else DEFAULT_CROP_MARGIN)
        return check_crop_margin("crop_margin", margin)

    def _crop_passes(self, crop_passes: int | None) -> int:
        if crop_passes is None:  # as the first pass's first model was trained (runners made elsewhere: one)
            return int(getattr(self.members[0].runner, "crop_passes", 1))
        return check_crop_passes("crop_passes", crop_passes)

    def _precision_of(self, checkpoint: Path | str, precision: str) -> str:
        """``precision``, or for ``auto`` the choice ``fashionkp precision`` measured and recorded for the file."""
        if precision != "auto":
            return precision
        record = recorded_choice(checkpoint) if self.device.type == "cpu" else None
        if record is None:
            return "fp32"
        log.info("%s: precision=auto runs %s", Path(checkpoint).name, describe_choice(record))
        return record["choice"]

    @staticmethod
    def _int8_file(checkpoint: Path | str, calibration: Sequence[Path | str]) -> Path:
        """The int8 model of a checkpoint: calibrated on ``calibration``, or the one ``fashionkp precision`` made."""
        if calibration:
            return cached_onnx(checkpoint, int8_calibration=calibration)
        recorded = recorded_int8_file(recorded_choice(checkpoint))
        if recorded:
            return recorded
        raise ConfigError(
            "precision", "int8", f"{Path(checkpoint).name} has no int8 model yet: it is calibrated on training photos",
            "give calibration_root=<a training split folder>, or run `fashionkp precision` on the checkpoint",
        )  # fmt: skip

    @staticmethod
    def _categories_of(members: list[Member]) -> list[str]:
        kinds = {m.runner.clothes for m in members}
        return [c for c in CATEGORY_KEYPOINTS if ALL in kinds or c in kinds]

    @staticmethod
    def model_names_of(members: list[Member]) -> list[str]:
        """File names of ``members`` as given (``<training>`` for a network in memory)."""
        return [m.name for m in members]

    @property
    def categories(self) -> list[str]:
        """Garment types this predictor can handle."""
        return self._categories_of(self.members)

    @property
    def identifies_types(self) -> bool:
        """Whether a model has a type head: photos may then come without their garment type."""
        return any(m.runner.has_type_head for m in self.members)

    @property
    def model_names(self) -> list[str]:
        """File names of the models as given (``<training>`` for a network in memory)."""
        return self.model_names_of(self.members)

    def members_for(self, category: str, members: list[Member] | None = None) -> list[Member]:
        """The models (of ``members``, else the first pass's) that serve ``category``."""
        check_category(category)
        pool = self.members if members is None else members
        members = [m for m in pool if m.runner.clothes in (category, ALL)]
        if not members:
            trained = sorted({m.runner.clothes for m in pool})
            raise GarmentTypeError(
                f"no model for garment type {category!r}: the checkpoints were trained for {trained}"
            )
        return members

    def codec_of(self, member: Member) -> HeatmapCodec:
        """The member's codec with this predictor's decoder settings, where given."""
        codec = member.runner.codec
        if self.decoder is not None:
            codec = replace(codec, decoder=self.decoder)
        return codec if self.decode_sigma is None else replace(codec, decode_sigma=self.decode_sigma)

    def _member_outputs(
        self,
        member: Member,
        batch: PhotoBatch,
        index: list[int],
        scales: tuple[float, ...],
        categories: Sequence[str | None],
    ) -> _MemberOutput:
        """Heatmaps (n, K, g, g) of one member for the photos ``index``, averaged over ``scales`` and flips, on
        its grid at the largest scale; and its type probabilities (n, 5), averaged likewise (None without a head).
        A network with the garment-type input is told ``categories[i]`` of each photo (None, while the types are
        being told: any type, the type head reads the backbone alone)."""
        runner = member.runner
        told = ()  # the runner's arguments after the images: the types, for a network that takes them
        if takes_types(runner):
            told = (np.array([CATEGORY_ID[check_category(categories[i] or CATEGORIES[0])] for i in index]),)
        grid = input_size_at(runner.input_size, max(scales)) // runner.codec.stride
        heatmap_sum, type_sum, passes = None, None, 0
        for scale in scales:
            inputs = batch.at(input_size_at(runner.input_size, scale), index)
            heatmaps, types = runner(inputs, *told)
            passes += 1
            if self.flip_test:
                mirrored, mirrored_types = runner(_mirror(inputs), *told)
                heatmaps = 0.5 * (heatmaps + flip_back(mirrored, flip_permutation(runner.clothes)))
                types = None if types is None else 0.5 * (types + mirrored_types)
            if heatmaps.shape[-1] != grid:
                heatmaps = F.interpolate(heatmaps, size=(grid, grid), mode="bilinear", align_corners=False)
            heatmap_sum = heatmaps if heatmap_sum is None else heatmap_sum + heatmaps
            if types is not None:
                type_sum = types if type_sum is None else type_sum + types
        types = None if type_sum is None else (type_sum / passes).cpu().numpy()
        return _MemberOutput(index, heatmap_sum / passes, types)

    def _one_pass(
        self,
        batch: PhotoBatch,
        categories: list[str],
        ran: dict[int, _MemberOutput],
        scales: tuple[float, ...],
        members: list[Member],
    ) -> np.ndarray:
        """(N, 24, 3) points of one pass of ``members`` over ``batch`` at ``scales``; ``ran`` holds the members
        that already ran on it and gains the others."""
        by_category = {c: self.members_for(c, members) for c in dict.fromkeys(categories)}
        # Each member runs once on all the photos it serves (one pass per flip and scale, not per garment type).
        for m in members:
            served = [i for i, c in enumerate(categories) if m in by_category[c]]
            if served and id(m) not in ran:
                ran[id(m)] = self._member_outputs(m, batch, served, scales, categories)
        out = np.full((len(batch), NUM_KEYPOINTS, 3), np.nan)
        for category, members in by_category.items():
            index = [i for i, c in enumerate(categories) if c == category]
            own = list(CATEGORY_KEYPOINTS[category])
            # Decoded on the finest member's grid, with its codec (its blur is in that grid's pixels).
            finest = max(members, key=lambda m: m.runner.input_size)
            codec = self.codec_of(finest)
            input_size = input_size_at(finest.runner.input_size, max(scales))
            grid = input_size // codec.stride
            total = None
            for m in members:
                rows = [ran[id(m)].index.index(i) for i in index]
                channels = [channels_for(m.runner.clothes).index(k) for k in own]
                maps = ran[id(m)].heatmaps[rows][:, channels]
                if maps.shape[-1] != grid:
                    maps = F.interpolate(maps, size=(grid, grid), mode="bilinear", align_corners=False)
                maps = m.weight * maps
                total = maps if total is None else total + maps.to(total.device)
            points, scores = codec.decode(total / sum(m.weight for m in members))
            out[np.ix_(index, own, [0, 1])] = batch.to_photo(points.cpu().numpy(), input_size, index)
            out[np.ix_(index, own, [2])] = scores.cpu().numpy()[..., None]
        return out

    def _type_probabilities(self, ran: dict[int, _MemberOutput], count: int) -> np.ndarray | None:
        """(count, 5) the type heads' probabilities, weighted over the members that saw each photo."""
        heads = [m for m in self.members if id(m) in ran and ran[id(m)].types is not None]
        if not heads:
            return None
        total, weight = np.zeros((count, len(CATEGORIES))), np.zeros((count, 1))
        for m in heads:
            total[ran[id(m)].index] += m.weight * ran[id(m)].types
            weight[ran[id(m)].index] += m.weight
        with np.errstate(invalid="ignore"):
            return total / weight

    def predict_letterboxed(self, batch: PhotoBatch, categories: Sequence[str | None]) -> Predictions:
        """Points in the photos' pixels, each photo of its garment type: given, or where it is None, the one
        the type heads tell. With ``two_pass`` a second pass looks at a crop around the first pass's points."""
        categories = list(categories)
        if len(categories) != len(batch):
            raise ValueError(f"{len(categories)} garment types for {len(batch)} photos")
        ran: dict[int, _MemberOutput] = {}
        unknown = [i for i, c in enumerate(categories) if c is None]
        if unknown:
            heads = [m for m in self.members if m.runner.has_type_head]
            if not heads:
                raise GarmentTypeError(
                    "the garment type of a photo was not given, and none of the models tells types (only a "
                    "clothes=all model trained with model.type_head=true does): give the type (clothes=...)"
                )
            for m in heads:  # clothes=all models: they serve every photo, so what they see now is kept
                ran[id(m)] = self._member_outputs(m, batch, list(range(len(batch))), self.scales, categories)
            told = self._type_probabilities(ran, len(batch))
            for i in unknown:
                categories[i] = CATEGORIES[int(told[i].argmax())]
            for m in heads:  # except the heatmaps of networks told a placeholder type: they run again, told theirs
                if takes_types(m.runner):
                    del ran[id(m)]
        points = self._one_pass(batch, categories, ran, self.scales, self.members)
        # with types to tell, every head already saw every photo: the pass added no type probabilities
        probabilities = told if unknown else self._type_probabilities(ran, len(batch))
        # Each crop pass looks at a crop around the previous pass's points; their points are averaged (two crop
        # passes: 7.76% NE against 7.86% for one on the CPU recipe's checkpoint, README "More crop passes")
        crops = []
        for _ in range(self.crop_passes):
            frames = [
                crop_frame(points[i, list(CATEGORY_KEYPOINTS[c]), :2], self.crop_margin, *batch.sizes[i])
                for i, c in enumerate(categories)
            ]
            points = self._one_pass(batch.reframed(frames), categories, {}, self.crop_scales, self.fine_members)
            crops.append(points)
        if crops:
            points = np.mean(crops, axis=0)
        predicted = [i in unknown for i in range(len(batch))]
        return Predictions(points, categories, probabilities, predicted)

    def predict_photos(self, images: Sequence[np.ndarray], categories: Sequence[str | None]) -> Predictions:
        """Points and garment types of RGB images (any size; grey, RGBA and 16-bit are converted); a None
        type is told by the models' type heads."""
        return self.predict_letterboxed(PhotoBatch.from_images(images), categories)

    def predict_batch(self, images: Sequence[np.ndarray], categories: Sequence[str | None]) -> np.ndarray:
        """(N, 24, 3) x, y, score in original pixels for RGB images; NaN outside each image's category."""
        return self.predict_photos(images, categories).points

    def fallback_points(self, category: str) -> np.ndarray:
        """(24, 2) points for a photo that cannot be read: the mean shape of the category's training photos
        (from the first model that recorded it), so that a submission still has a row for every image."""
        index = CATEGORIES.index(check_category(category))
        for member in self.members_for(category):
            if member.runner.mean_shape is not None:
                return np.nan_to_num(member.runner.mean_shape[index], nan=UNKNOWN_SHAPE_POINT)
        return np.full((NUM_KEYPOINTS, 2), UNKNOWN_SHAPE_POINT)

    def predict(self, image: np.ndarray | Path | str, category: str | None = None) -> np.ndarray:
        """(24, 3) x, y, score for one image (array in RGB, or a path); NaN outside its category (None: the
        one the type heads tell)."""
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


class FilePredictions(NamedTuple):
    #: (N, 24, 3) points, NaN rows for images that could not be read
    points: np.ndarray
    #: one message per unreadable image
    failures: list[str]
    #: each image's (h, w), (0, 0) where unreadable
    sizes: list[tuple[int, int]]
    #: each image's garment type: given, or told by the type heads (None where unreadable and not given)
    categories: list[str | None]
    #: (N, 5) type probabilities of the type heads (NaN rows where none ran), or None without a head
    type_probabilities: np.ndarray | None


def run_on_files(
    predictor: KeypointPredictor,
    paths: Sequence[Path],
    categories: Sequence[str | None],
    batch_size: int = 8,
    num_workers: int = 2,
    progress: bool = True,
) -> FilePredictions:
    """Predict every image (a None garment type is told by the models' type heads); unreadable images are
    reported and skipped, never fatal."""
    out = np.full((len(paths), NUM_KEYPOINTS, 3), np.nan)
    sizes: list[tuple[int, int]] = [(0, 0)] * len(paths)
    told: list[str | None] = list(categories)
    probabilities = np.full((len(paths), len(CATEGORIES)), np.nan) if predictor.identifies_types else None
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
            result = predictor.predict_photos([img for _, img in good], [categories[i] for i in idx])
            out[idx] = result.points
            for row, (i, img) in enumerate(good):
                sizes[i], told[i] = img.shape[:2], result.categories[row]
            if probabilities is not None and result.type_probabilities is not None:
                probabilities[idx] = result.type_probabilities
    return FilePredictions(out, failures, sizes, told, probabilities)


def predictor_from_cfg(cfg: DictConfig) -> KeypointPredictor:
    """The predictor that predict.py and evaluate.py configs describe (checked first: one clear line on a typo)."""
    check_inference_config(cfg)
    roots = as_list(cfg.get("calibration_root"))
    photos = calibration_photos(roots, cfg.calibration_images) if roots and cfg.precision in ("int8", "auto") else ()
    predictor = KeypointPredictor(
        as_list(cfg.checkpoints), weights=as_list(cfg.get("weights")) or None, device=cfg.device,
        flip_test=cfg.flip_test, scales=as_list(cfg.scales) or None, decoder=cfg.decoder,
        channels_last=cfg.get("channels_last"), backend=cfg.get("backend", "auto"), precision=cfg.precision,
        calibration=photos, two_pass=cfg.two_pass, crop_margin=cfg.crop_margin,
        crop_scales=as_list(cfg.get("crop_scales")) or None, crop_passes=cfg.get("crop_passes"),
        fine_checkpoints=as_list(cfg.get("fine_checkpoints")),
        fine_weights=as_list(cfg.get("fine_weights")) or None,
    )  # fmt: skip
    log.info("test scales %s%s", list(predictor.scales), "" if cfg.scales else " (the model's own)")
    if predictor.crop_margin is not None:
        fine = predictor.model_names_of(predictor.fine_members) if cfg.get("fine_checkpoints") else None
        log.info("%d crop pass(es) after the first, each on a crop around the previous pass's points, margin %.2f%s",
                 predictor.crop_passes, predictor.crop_margin,
                 f", by the crop-pass models {fine}" if fine else "")  # fmt: skip
    return predictor
