"""Decoding accuracy (heatmap pixels) and time per image for argmax, the quarter-offset rule (the reference
CPN system's) and DARK.

python benchmarks/bench_decoding.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import median_seconds, print_table  # noqa: E402

from fashionkp.data.codec import decode_peaks, gaussian_targets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    size, sigma, k = 64, 2.0, 24  # a 256-px input: 64x64 heatmaps, 24 keypoints
    n_maps = 240 if args.quick else 2400
    centres = rng.uniform(3, size - 4, (n_maps, 2))
    clean = torch.from_numpy(gaussian_targets(centres, np.ones(n_maps, bool), size, size, sigma)).view(
        -1, k, size, size
    )
    torch.manual_seed(0)
    noisy = (clean + 0.05 * torch.randn_like(clean)).clamp_min(0)
    per_image = clean[:8]  # time a batch of 8 images of 24 heatmaps each
    rows = []
    for method in ("argmax", "quarter_offset", "dark"):
        row = {"decoder": method}
        for name, maps in (("clean", clean), ("noisy", noisy)):
            coords, _ = decode_peaks(maps, method, sigma / 2)
            err = np.hypot(*(coords.reshape(-1, 2).numpy() - centres).T)
            row[f"{name} mean px"] = f"{err.mean():.4f}"
            row[f"{name} max px"] = f"{err.max():.3f}"
        t = median_seconds(lambda m=method: decode_peaks(per_image, m, sigma / 2), 5 if args.quick else 30)
        row["ms / image"] = f"{1000 * t / 8:.3f}"
        row["_t"] = t
        rows.append(row)
    print(
        f"decoding {n_maps} Gaussians (sigma {sigma}, {size}x{size}, 5% noise for 'noisy'); time: batch 8 x 24 maps, "
        f"{args.threads} threads, median"
    )
    print_table(rows, ["decoder", "clean mean px", "clean max px", "noisy mean px", "noisy max px", "ms / image"])
    t = {r["decoder"]: r["_t"] for r in rows}
    print(f"DARK time / quarter-offset rule time: {t['dark'] / t['quarter_offset']:.2f}")


if __name__ == "__main__":
    main()
