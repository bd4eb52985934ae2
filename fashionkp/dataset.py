"""Records -> training/validation samples (one affine, colour, heatmap targets) and the DataModule."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from fashionkp.checks import as_list
from fashionkp.errors import ConfigError
from fashionkp.fashionai import Record, read_splits
from fashionkp.heatmaps import gaussian_targets, input_to_heatmap
from fashionkp.images import load_image
from fashionkp.keypoints import ALL, CATEGORIES, NUM_KEYPOINTS, channels_for, check_category
from fashionkp.transforms import (
    AugmentConfig,
    letterbox_matrix,
    photometric,
    random_matrix,
    transform_keypoints,
    warp_image,
)

log = logging.getLogger(__name__)
CATEGORY_ID = {c: i for i, c in enumerate(CATEGORIES)}


@dataclass
class TargetConfig:
    """Heatmap targets: Gaussian sigma (heatmap pixels) of RefineNet and of every GlobalNet level."""

    sigma: float = 2.0
    global_sigma: float = 2.0
    stride: int = 4
    #: Occluded points (v=0) carry a known position; the official metric counts them.
    include_occluded: bool = True


class KeypointDataset(Dataset):
    """Samples for one model: ``clothes`` decides the channels (a category's points or all 24)."""

    def __init__(
        self,
        records: Sequence[Record],
        clothes: str,
        input_size: int,
        targets: TargetConfig,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError(f"empty dataset for clothes={clothes!r}")
        if input_size % 32:
            raise ValueError(f"input size must be a multiple of 32, got {input_size}")
        self.records = list(records)
        self.clothes = check_category(clothes, allow_all=True)
        self.channels = list(channels_for(clothes))
        self.input_size = input_size
        self.targets = targets
        self.augment = augment
        self.color = photometric(augment.color) if augment else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # EpochSampler hands (index, epoch): augmentation then depends on nothing a worker or a resume loses.
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        image = load_image(record.image_path)
        h, w = image.shape[:2]
        size = self.input_size
        if self.augment is not None:
            # A per-(seed, epoch, index) generator makes augmentation reproducible across workers and resumes.
            rng = np.random.default_rng((self.seed, epoch, index))
            matrix, flipped = random_matrix(rng, h, w, size, self.augment)
        else:
            matrix, flipped = letterbox_matrix(h, w, size), False
        sample_image = warp_image(image, matrix, size)
        if self.color is not None:
            self.color.set_random_seed(int(rng.integers(2**31)))
            sample_image = self.color(image=sample_image)["image"]
        gt = record.keypoints
        kp = transform_keypoints(gt[self.channels], matrix, flipped, self.clothes, size)
        hm_size = size // self.targets.stride
        points = input_to_heatmap(kp[:, :2], self.targets.stride)
        min_v = 0 if self.targets.include_occluded else 1
        valid = kp[:, 2] >= min_v
        target = gaussian_targets(points, valid, hm_size, hm_size, self.targets.sigma)
        sample = {
            "image": torch.from_numpy(sample_image).permute(2, 0, 1).contiguous(),
            "target": torch.from_numpy(target),
            "weight": torch.from_numpy(valid.astype(np.float32)),
            "keypoints": torch.from_numpy(gt),
            "matrix": torch.from_numpy(matrix.astype(np.float64)),
            "category": CATEGORY_ID[record.category],
        }
        if self.targets.global_sigma != self.targets.sigma:
            sample["target_global"] = torch.from_numpy(
                gaussian_targets(points, valid, hm_size, hm_size, self.targets.global_sigma)
            )
        return sample


class EpochSampler(Sampler):
    """Yields ``(index, epoch)``; the order is a function of (seed, epoch) alone and is sharded over
    distributed ranks, so a resumed run sees exactly the samples an uninterrupted one would.

    Training shards are padded to equal length (DDP needs equal step counts); validation shards are
    not, so that every image is scored exactly once.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, samples: int) -> None:
        """The next iteration starts ``samples`` into ``epoch`` (a run resumed from a mid-epoch checkpoint)."""
        self.epoch, self._skip = epoch, samples

    @staticmethod
    def _world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _indices(self) -> list[int]:
        rank, world = self._world()
        if not self.shuffle:
            return list(range(rank, self.size, world))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[: (-len(order)) % world]
        return order[rank::world]

    def __iter__(self):
        indices, self._skip = self._indices()[self._skip :], 0
        return iter([(i, self.epoch) for i in indices])

    def __len__(self) -> int:
        return len(self._indices())


class ResumableLoader(DataLoader):
    """A DataLoader whose place in the epoch goes into Lightning's checkpoints (through ``state_dict``), so
    that a run resumed from a checkpoint written mid-epoch sees exactly the batches an uninterrupted run
    would have seen next.

    ``batches_done`` tells how many batches of the current epoch the training loop has consumed: the
    loader itself cannot know, since workers fetch ahead.
    """

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        done, epoch = self.batches_done(), self.sampler.epoch
        if done >= len(self):  # an end-of-epoch checkpoint: the next epoch starts from its beginning
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "samples": done * self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume_at(state["epoch"], state["samples"])


def mean_shape(records: Sequence[Record]) -> np.ndarray:
    """(5, 24, 2) mean position of every point per garment type, in original pixels (NaN where a type has
    no annotation): the prediction written for a test photo that cannot be read."""
    out = np.full((len(CATEGORIES), NUM_KEYPOINTS, 2), np.nan)
    for i, category in enumerate(CATEGORIES):
        points = [r.keypoints[:, :2] for r in records if r.category == category and r.keypoints is not None]
        if points:
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: points a type never has
                out[i] = np.nanmean(np.stack(points), axis=0)
    return out


def is_validation(image_id: str, fraction: float, salt: str = "fashionkp") -> bool:
    """Deterministic split by a hash of the image id: stable across machines, orders and subsets."""
    digest = hashlib.md5(f"{salt}:{image_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def split_records(records: Sequence[Record], fraction: float, salt: str = "fashionkp") -> tuple[list, list]:
    train = [r for r in records if not is_validation(r.image_id, fraction, salt)]
    val = [r for r in records if is_validation(r.image_id, fraction, salt)]
    return train, val


@dataclass
class DataConfig:
    root: Sequence[str] | str = ""
    #: Separate validation split folder(s); when empty, ``val_fraction`` of ``root`` by image-id hash.
    val_root: Sequence[str] | str | None = None
    val_fraction: float = 0.2
    val_salt: str = "fashionkp"
    batch_size: int = 16
    num_workers: int = 2
    missing_images: str = "error"
    #: Use at most this many training images (0 = all); for quick runs.
    limit_train: int = 0
    seed: int = 0
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)


class FashionAIDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, clothes: str, input_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.clothes = check_category(clothes, allow_all=True)
        self.input_size = input_size
        self.train_set: KeypointDataset | None = None
        self.val_set: KeypointDataset | None = None
        self.mean_shape: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        cfg = self.cfg
        if not cfg.root:
            raise ValueError("data.root is empty: give a FashionAI split folder (or a list of them)")
        categories = None if self.clothes == ALL else [self.clothes]
        records = read_splits(as_list(cfg.root), categories, cfg.missing_images)
        if cfg.val_root:
            train, val = records, read_splits(as_list(cfg.val_root), categories, cfg.missing_images)
        else:
            train, val = split_records(records, cfg.val_fraction, cfg.val_salt)
        if cfg.limit_train:
            train = train[: cfg.limit_train]
        if not train or not val:
            raise ConfigError(
                "data.val_fraction", cfg.val_fraction,
                f"leaves an empty {'training' if not train else 'validation'} split for clothes={self.clothes} "
                f"({len(records)} images in {cfg.root})",
            )  # fmt: skip
        log.info("clothes=%s: %d training and %d validation images", self.clothes, len(train), len(val))
        self.mean_shape = mean_shape(train)
        self.train_set = KeypointDataset(train, self.clothes, self.input_size, cfg.targets, cfg.augment, cfg.seed)
        self.val_set = KeypointDataset(val, self.clothes, self.input_size, cfg.targets, None)

    def _loader(self, dataset: KeypointDataset, shuffle: bool) -> DataLoader:
        kwargs = {"batches_done": self._training_batches_done} if shuffle else {}
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=EpochSampler(len(dataset), self.cfg.seed, shuffle),
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
            drop_last=shuffle and len(dataset) > self.cfg.batch_size,
            **kwargs,
        )

    def _training_batches_done(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
