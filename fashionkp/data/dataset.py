"""Records -> training/validation samples (one affine, colour, heatmap targets) and the DataModule."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fashionkp.config import as_list
from fashionkp.data.codec import HeatmapCodec
from fashionkp.data.fashionai import Record, read_splits
from fashionkp.data.images import load_image
from fashionkp.data.keypoints import ALL, CATEGORIES, CATEGORY_ID, NUM_KEYPOINTS, channels_for, check_category
from fashionkp.data.split import split_records
from fashionkp.data.transforms import (
    Augmentation,
    erase_rectangle,
    letterbox_matrix,
    photometric,
    random_matrix,
    transform_keypoints,
    warp_image,
)
from fashionkp.errors import ConfigError

log = logging.getLogger(__name__)


class KeypointDataset(Dataset):
    """Samples for one model: ``clothes`` decides the channels (a category's points or all 24)."""

    def __init__(
        self,
        records: Sequence[Record],
        clothes: str,
        input_size: int,
        codec: HeatmapCodec,
        augmentation: Augmentation | None,
        seed: int,
        keep_photos: bool = False,
    ) -> None:
        if not records:
            raise ValueError(f"empty dataset for clothes={clothes!r}")
        if input_size % 32:
            raise ValueError(f"input size must be a multiple of 32, got {input_size}")
        self.records = list(records)
        self.clothes = check_category(clothes, allow_all=True)
        self.channels = list(channels_for(clothes))
        self.input_size = input_size
        self.codec = codec
        self.augmentation = augmentation
        self.color = photometric(augmentation.color) if augmentation else None
        self.seed = seed
        #: Samples carry the photo itself ("photo"), for the crop pass of the two-pass predictor in validation.
        self.keep_photos = keep_photos

    def __len__(self) -> int:
        return len(self.records)

    def _annotated(self, record: Record) -> np.ndarray:
        """(K, 2) the model's points with known positions (NaN elsewhere): where crop samples centre."""
        points = record.keypoints[self.channels]
        known = points[:, 2] >= (0 if self.codec.include_occluded else 1)
        return np.where(known[:, None], points[:, :2], np.nan)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        # EpochSampler hands (index, epoch): augmentation then depends on nothing a worker or a resume loses.
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        image = load_image(record.image_path)
        h, w = image.shape[:2]
        size = self.input_size
        if self.augmentation is not None:
            # A per-(seed, epoch, index) generator makes augmentation reproducible across workers and resumes.
            rng = np.random.default_rng((self.seed, epoch, index))
            matrix, flipped = random_matrix(rng, h, w, size, self.augmentation, self._annotated(record))
        else:
            matrix, flipped = letterbox_matrix(h, w, size), False
        sample_image = warp_image(image, matrix, size)
        if self.color is not None:
            self.color.set_random_seed(int(rng.integers(2**31)))
            sample_image = self.color(image=sample_image)["image"]
        # drawn last, and not at all at erase=0: the samples of runs without erasing stay as they were
        if self.augmentation is not None and self.augmentation.erase and rng.random() < self.augmentation.erase:
            sample_image = erase_rectangle(sample_image, rng, self.augmentation.erase_area)
        gt = record.keypoints
        kp = transform_keypoints(gt[self.channels], matrix, flipped, self.clothes, size)
        targets = self.codec.encode(kp[:, :2], kp[:, 2], size)
        sample = {
            "image": torch.from_numpy(sample_image).permute(2, 0, 1).contiguous(),
            "keypoints": torch.from_numpy(gt),
            # the photo's (h, w): the predictor maps points back into it and clips them to it
            "size": torch.tensor([h, w]),
            "category": CATEGORY_ID[record.category],
            **{k: torch.from_numpy(v) for k, v in targets.items()},
        }
        if self.keep_photos:
            sample["photo"] = image
        return sample


def collate_samples(samples: list[dict]) -> dict:
    """Lightning's default collation, photos (of any size) kept as a list."""
    photos = [s.pop("photo") for s in samples if "photo" in s]
    batch = default_collate(samples)
    if photos:
        batch["photo"] = photos
    return batch


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


class FashionAIDataModule(pl.LightningDataModule):
    """FashionAI split folders -> training and validation loaders for one model (``clothes``).

    Built from ``conf/data`` with ``hydra.utils.instantiate``; the codec is the model's (its stride).
    """

    def __init__(
        self,
        root: Sequence[str] | str,
        val_root: Sequence[str] | str | None,
        val_fraction: float,
        val_salt: str,
        batch_size: int,
        num_workers: int,
        missing_images: str,
        limit_train: int,
        seed: int,
        clothes: str,
        input_size: int,
        augmentation: Augmentation | None,
        codec: HeatmapCodec,
        keep_val_photos: bool,
    ) -> None:
        super().__init__()
        self.root, self.val_root = as_list(root), as_list(val_root)
        self.val_fraction, self.val_salt = val_fraction, val_salt
        self.batch_size, self.num_workers = batch_size, num_workers
        self.missing_images, self.limit_train, self.seed = missing_images, limit_train, seed
        self.clothes = check_category(clothes, allow_all=True)
        self.input_size = input_size
        self.augmentation, self.codec = augmentation, codec
        #: validation samples carry their photos: the crop pass of a two-pass model needs the full resolution
        self.keep_val_photos = keep_val_photos
        self.train_set: KeypointDataset | None = None
        self.val_set: KeypointDataset | None = None
        self.mean_shape: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root:
            raise ConfigError("data.root", [], "no FashionAI split folder given")
        categories = None if self.clothes == ALL else [self.clothes]
        records = read_splits(self.root, categories, self.missing_images)
        if self.val_root:
            train, val = records, read_splits(self.val_root, categories, self.missing_images)
        else:
            train, val = split_records(records, self.val_fraction, self.val_salt)
        if self.limit_train:
            train = train[: self.limit_train]
        if not train or not val:
            raise ConfigError(
                "data.val_fraction", self.val_fraction,
                f"leaves an empty {'training' if not train else 'validation'} split for clothes={self.clothes} "
                f"({len(records)} images in {self.root})",
            )  # fmt: skip
        log.info("clothes=%s: %d training and %d validation images", self.clothes, len(train), len(val))
        self.mean_shape = mean_shape(train)
        self.train_set = KeypointDataset(train, self.clothes, self.input_size, self.codec, self.augmentation, self.seed)
        self.val_set = KeypointDataset(
            val, self.clothes, self.input_size, self.codec, None, self.seed, keep_photos=self.keep_val_photos
        )

    def _loader(self, dataset: KeypointDataset, shuffle: bool) -> DataLoader:
        kwargs = {"batches_done": self._training_batches_done} if shuffle else {}
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(dataset), self.seed, shuffle),
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(dataset) > self.batch_size,
            collate_fn=collate_samples,
            **kwargs,
        )

    def _training_batches_done(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
