"""The validation split: a fixed fraction of the images chosen by a hash of the image id, the same in
training, ``evaluate.py`` and on every machine."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from fashionkp.data.fashionai import Record


def is_validation(image_id: str, fraction: float, salt: str) -> bool:
    """Deterministic split by a hash of the image id: stable across machines, orders and subsets."""
    digest = hashlib.md5(f"{salt}:{image_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def split_records(records: Sequence[Record], fraction: float, salt: str) -> tuple[list[Record], list[Record]]:
    """(training, validation) records."""
    train = [r for r in records if not is_validation(r.image_id, fraction, salt)]
    val = [r for r in records if is_validation(r.image_id, fraction, salt)]
    return train, val
