"""The ``fashionkp`` utility: score, draw, synth, concat, export, precision, report, serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fashionkp.errors import UserError
from fashionkp.serving import MAX_BYTES, MAX_PIXELS


def cmd_score(args: argparse.Namespace) -> int:
    from fashionkp.evaluation.metric import score_submission

    result = score_submission(args.answers, args.submission)
    print(result.table())
    if args.per_keypoint:
        for k, v in result.per_keypoint.items():
            print(f"  {k:<18} {100 * v:8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=2))
    return 0


def cmd_draw(args: argparse.Namespace) -> int:
    from fashionkp.data.fashionai import read_splits
    from fashionkp.data.images import load_image
    from fashionkp.draw import draw_keypoints, grid_sheet, save_image

    records = read_splits(args.split, args.category and [args.category])
    rng = np.random.default_rng(args.seed)
    chosen = [records[i] for i in sorted(rng.choice(len(records), min(args.n, len(records)), replace=False))]
    tiles = [draw_keypoints(load_image(r.image_path), r.keypoints, r.category, label=r.category) for r in chosen]
    path = save_image(args.out, grid_sheet(tiles, args.columns, args.tile))
    print(f"drew {len(tiles)} images of {args.split} -> {path}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from fashionkp.data.synth import generate

    paths = generate(args.out_dir, args.n_per_category, args.n_test_per_category, args.seed, args.max_side)
    for k, v in paths.items():
        print(f"{k:<10} {v}")
    return 0


def cmd_concat(args: argparse.Namespace) -> int:
    from fashionkp.data.submission import concat_submissions

    print(concat_submissions(args.inputs, args.out))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import os

    from fashionkp.errors import ConfigError
    from fashionkp.inference.export import export_onnx
    from fashionkp.inference.precision import (
        PRECISION_CHOICES,
        calibration_photos,
        describe_choice,
        onnx_choice,
        onnxruntime_bf16_error,
        quantize_int8,
        recorded_choice,
        recorded_int8_file,
        stamp_onnx,
    )

    precision = args.precision  # checked here, not by argparse: the choices live with the (heavy) precision module
    if precision not in PRECISION_CHOICES:
        raise ConfigError("--precision", precision, "not a valid choice", PRECISION_CHOICES)
    record = recorded_choice(args.checkpoint) if precision in ("auto", "int8") else None
    if precision == "auto" and record is None:
        print(f"precision=auto: no valid measurement of {args.checkpoint} (`fashionkp precision` makes one): fp32")
        precision = "fp32"
    elif precision == "auto":
        precision = onnx_choice(record)
        print(f"precision=auto: {describe_choice(record, precision)}")
    if precision == "bf16":
        why = onnxruntime_bf16_error() or "fashionkp exports fp32 and int8 only"
        raise UserError(f"fashionkp export --precision bf16: an ONNX file cannot run in bf16 here ({why}); bf16 runs "
                        "through PyTorch autocast: give the .ckpt to predict.py, evaluate.py or `fashionkp serve` with "
                        "precision=bf16")  # fmt: skip
    # int8: the file that was measured, unless told to calibrate a new one (whose NE nobody measured)
    told_to_calibrate = args.precision == "int8" and args.calibration_root
    measured_int8 = recorded_int8_file(record) if precision == "int8" and not told_to_calibrate else None
    if precision == "int8" and args.precision == "auto" and not measured_int8 and args.calibration_root:
        print("precision=auto: the measured int8 file is gone; a new one is calibrated (its NE was never measured)")
    if precision == "int8" and not (measured_int8 or args.calibration_root):
        raise UserError(f"fashionkp export: {args.checkpoint} has no measured int8 file (`fashionkp precision` makes "
                        "one); or give --precision int8 --calibration-root <a training split folder>")  # fmt: skip
    out = Path(args.out)
    temporaries = [out.with_name(f".{out.name}.{os.getpid()}.{kind}.tmp") for kind in ("fp32", "int8")]
    try:
        source = measured_int8
        if source is None:
            record = record if precision == "fp32" else None  # a newly calibrated int8 file was never measured
            source = export_onnx(args.checkpoint, temporaries[0], args.opset)
            if precision == "int8":
                photos = calibration_photos(args.calibration_root, args.calibration_images)
                source = quantize_int8(source, temporaries[1], photos)
        # the measurement travels inside the file: whoever runs it is told what it costs against fp32
        choice = record and {k: v for k, v in record.items() if k != "int8_onnx"}  # (a path of this machine's cache)
        print(stamp_onnx(source, out, precision_choice=choice))
    finally:
        for path in temporaries:
            path.unlink(missing_ok=True)
    return 0


def cmd_precision(args: argparse.Namespace) -> int:
    from fashionkp.evaluation.choose_precision import measure_precisions, table
    from fashionkp.inference.precision import record_path

    record = measure_precisions(
        args.checkpoint, args.data_root, args.val_fraction, args.val_salt, args.calibration_images, args.val_images,
        args.threads,
    )  # fmt: skip
    print(table(record))
    print(f"recorded: {record_path(args.checkpoint)} (precision=auto now runs {args.checkpoint} in {record['choice']})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fashionkp.evaluation.report import write_report

    table, paths = write_report(args.root, args.out)
    print(table)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("litserve") is None:
        raise UserError("fashionkp serve needs LitServe, which the serve extra installs: pip install -e '.[serve]'")
    from fashionkp.serving.server import serve

    serve(
        args.checkpoints, args.host, args.port, args.log_level, device=args.device, precision=args.precision,
        max_pixels=args.max_pixels, max_bytes=args.max_bytes, max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout, workers=args.workers, threads=args.threads, timeout=args.timeout,
    )  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashionkp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="official NE of a submission against an answer CSV")
    p.add_argument("answers")
    p.add_argument("submission")
    p.add_argument("--per-keypoint", action="store_true")
    p.add_argument("--json", help="also write the breakdown to this JSON file")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("draw", help="draw ground-truth annotations of a split on a grid sheet")
    p.add_argument("split", help="split folder (or CSV)")
    p.add_argument("--out", default="outputs/annotations_sheet.jpg")
    p.add_argument("-n", type=int, default=16)
    p.add_argument("--category")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_draw)

    p = sub.add_parser("synth", help="generate synthetic garments in the FashionAI format")
    p.add_argument("out_dir")
    p.add_argument("--n-per-category", type=int, default=100)
    p.add_argument("--n-test-per-category", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-side", type=int, default=256)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("concat", help="join per-category submission files into one")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_concat)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (dynamic batch), in its measured precision")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--precision", default="auto",
                   help="auto, fp32, bf16 or int8. auto: the fastest within 0.1 NE points of fp32 as `fashionkp "
                        "precision` measured it (fp32 if never measured); int8: the measured int8 file, or onnxruntime "
                        "static QDQ quantization calibrated on --calibration-root; bf16 runs through PyTorch autocast "
                        "only. --opset applies to new exports, not to the measured int8 file")  # fmt: skip
    p.add_argument("--calibration-root", nargs="+", help="FashionAI split folder(s): training photos calibrate int8")
    p.add_argument("--calibration-images", type=int, default=128)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "precision", help="measure fp32/bf16/int8 NE and speed of a checkpoint; record the choice for precision=auto"
    )
    p.add_argument("checkpoint")
    p.add_argument("--data-root", nargs="+", required=True, help="the FashionAI split folder(s) it was trained on")
    p.add_argument("--val-fraction", type=float, default=0.2, help="the training run's data.val_fraction")
    p.add_argument("--val-salt", default="fashionkp", help="the training run's data.val_salt")
    p.add_argument("--calibration-images", type=int, default=128, help="training photos that calibrate int8")
    p.add_argument("--val-images", type=int, default=0, help="measure NE on at most this many (0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_precision)

    p = sub.add_parser("report", help="overall and per-category validation NE (%%) of the runs under a folder")
    p.add_argument("root", help="a sweep folder (outputs/multirun/train/<time>), a run folder or a folder of runs")
    p.add_argument("--out", help="folder for report.md, report.csv and report.png (default: root)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="an HTTP API (POST /predict) and a web page (GET /) for your own photos")
    p.add_argument("checkpoints", nargs="+", help=".ckpt or .onnx files: one model or an ensemble")
    # LitServe binds these three only
    p.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"),
                   help="127.0.0.1: this machine only; 0.0.0.0 or ::, every network interface")  # fmt: skip
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or int8, as predict.py's precision=")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="larger photos are refused (413)")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="larger request bodies are refused (413)")
    p.add_argument("--max-batch-size", type=int, default=8, help="concurrent requests run as one batch, up to this")
    p.add_argument("--batch-timeout", type=float, default=0.01,
                   help="seconds a worker waits for a batch to fill")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="model worker processes per device")
    p.add_argument("--threads", type=int, default=0, help="threads per CPU worker (0: the cores shared among them)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may wait for a worker (then 504)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError, OSError) as e:
        print(f"fashionkp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
