"""``fashionkp precision``: a checkpoint in fp32, bf16 and int8 on this CPU, each measured for NE on the validation
split and for latency per image; the fastest within 0.1 NE points of fp32 is recorded beside the checkpoint, where
``precision=auto`` (the CPU default of predict.py, evaluate.py and KeypointPredictor) finds it."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fashionkp.data.fashionai import read_splits
from fashionkp.data.split import split_records
from fashionkp.evaluation.evaluate import score
from fashionkp.inference.checkpoint import load_checkpoint
from fashionkp.inference.precision import (
    INT8_SCHEME,
    NE_TOLERANCE,
    PRECISIONS,
    calibration_photos,
    choose,
    cpu_features,
    letterboxed,
    record_path,
    usable,
)
from fashionkp.inference.predictor import KeypointPredictor, cached_onnx, run_on_files, takes_types

log = logging.getLogger(__name__)


def latency_ms(predictor: KeypointPredictor, photo: Path, repeats: int = 10) -> float:
    """Median milliseconds of one network forward pass on one letterboxed photo (batch 1)."""
    runner = predictor.members[0].runner
    x = letterboxed(photo, runner.input_size).astype(np.uint8)
    # a network told the garment type: any type, the work is the same
    args = (x, np.zeros(1, dtype=np.int64)) if takes_types(runner) else (x,)
    runner(*args)  # warm-up: first-call allocations and oneDNN kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(*args)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure_precisions(
    checkpoint: Path | str,
    roots: Sequence[Path | str],
    val_fraction: float = 0.2,
    val_salt: str = "fashionkp",
    calibration_images: int = 128,
    val_images: int = 0,
    threads: int = 2,
) -> dict:
    """NE (percent, whole-pixel points as submitted) and latency of every precision this CPU can run; the record
    it writes beside the checkpoint is returned."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _measure(checkpoint, roots, val_fraction, val_salt, calibration_images, val_images, threads)
    finally:
        torch.set_num_threads(before)  # the caller's process keeps its own setting


def _measure(checkpoint, roots, val_fraction, val_salt, calibration_images, val_images, threads) -> dict:
    trained = load_checkpoint(checkpoint)
    categories = None if trained.clothes == "all" else [trained.clothes]
    val = split_records(read_splits(list(roots), categories, "skip"), val_fraction, val_salt)[1]
    if val_images:
        val = [val[i] for i in sorted(set(np.linspace(0, len(val) - 1, min(val_images, len(val))).astype(int)))]
    photos = calibration_photos(roots, calibration_images, val_fraction, val_salt, categories)
    int8_file = cached_onnx(checkpoint, int8_calibration=photos)
    figures: dict[str, dict[str, float]] = {}
    for precision in PRECISIONS:
        if usable(precision, "cpu") != precision:
            continue  # the log line says why
        predictor = KeypointPredictor([checkpoint], device="cpu", precision=precision, calibration=photos,
                                      onnx_threads=threads)  # fmt: skip
        points = run_on_files(predictor, [r.image_path for r in val], [r.category for r in val], 8, 1).points
        _, _, result = score(val, points, round_points=True)
        figures[precision] = {
            "ne": round(100 * result.ne, 4),
            "ms_per_image": round(latency_ms(predictor, photos[0]), 1),
        }
        log.info(
            "%s: NE %.2f%%, %.1f ms per image", precision, figures[precision]["ne"], figures[precision]["ms_per_image"]
        )
    record = {
        "checkpoint": str(checkpoint), "checkpoint_size": Path(checkpoint).stat().st_size,
        "choice": choose(figures), "tolerance_points": NE_TOLERANCE, "figures": figures,
        "validation_images": len(val), "test_scales": list(trained.scales), "two_pass": trained.crop_margin is not None,
        "calibration_photos": len(photos), "threads": threads,
        "cpu": cpu_features().describe(), "int8_onnx": str(int8_file), "int8_scheme": INT8_SCHEME, "unit": "%",
    }  # fmt: skip
    record_path(checkpoint).write_text(json.dumps(record, indent=2))
    return record


def table(record: dict) -> str:
    fp32 = record["figures"]["fp32"]
    lines = [f"{'precision':<10} {'NE %':>7} {'vs fp32':>8} {'ms/image':>9} {'speed-up':>9}"]
    for precision, f in record["figures"].items():
        mark = "  <- chosen" if precision == record["choice"] else ""
        lines.append(f"{precision:<10} {f['ne']:7.2f} {f['ne'] - fp32['ne']:+8.2f} {f['ms_per_image']:9.1f} "
                     f"{fp32['ms_per_image'] / f['ms_per_image']:8.2f}x{mark}")  # fmt: skip
    lines.append(f"{record['validation_images']} validation images, {record['threads']} threads, CPU: {record['cpu']}; "
                 f"chosen: the fastest within {record['tolerance_points']} NE points of fp32")  # fmt: skip
    return "\n".join(lines)
