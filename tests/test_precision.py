"""Inference precisions: int8 (onnxruntime QDQ, calibrated), bf16 (autocast), CPU detection and fallbacks, and the
measured choice behind precision=auto."""

import json
import logging

import numpy as np
import onnx
import pytest
import torch

from fashionkp.cli import main as cli
from fashionkp.data.fashionai import read_csv
from fashionkp.data.images import load_image
from fashionkp.data.keypoints import CATEGORY_KEYPOINTS
from fashionkp.inference import precision as precision_module
from fashionkp.inference.precision import (
    INT8_SCHEME,
    CpuFeatures,
    calibration_photos,
    choose,
    cpu_features,
    onnxruntime_bf16_error,
    read_info,
    record_path,
    usable,
)
from fashionkp.inference.predictor import KeypointPredictor, OnnxHeatmapRunner, TorchHeatmapRunner, cached_onnx

NO_BF16_NO_VNNI = CpuFeatures(frozenset({"avx2", "fma"}))
FULL = CpuFeatures(frozenset({"avx512f", "avx512_bf16", "avx512_vnni"}))


def test_cpu_features_and_fallbacks(caplog):
    assert FULL.bf16 and FULL.vnni and FULL.describe() == "AVX-512, bf16 yes, VNNI yes"
    assert not NO_BF16_NO_VNNI.bf16 and NO_BF16_NO_VNNI.describe() == "AVX2, bf16 no, VNNI no"
    with caplog.at_level(logging.WARNING):
        assert usable("bf16", "cpu", NO_BF16_NO_VNNI) == "fp32"
        assert usable("int8", "cpu", NO_BF16_NO_VNNI) == "int8"  # runs, only slower
        assert usable("int8", "cuda") == "fp32"
    assert "has no AVX-512 BF16 or AMX, so fp32 instead" in caplog.text
    assert "has no VNNI; int8 runs, but may be slower than fp32" in caplog.text
    assert usable("bf16", "cpu", FULL) == "bf16" and usable("fp32", "cpu", NO_BF16_NO_VNNI) == "fp32"


def test_the_choice_is_the_fastest_within_a_tenth_of_a_point():
    figures = {"fp32": {"ne": 9.00, "ms_per_image": 100.0}, "bf16": {"ne": 9.08, "ms_per_image": 60.0},
               "int8": {"ne": 9.30, "ms_per_image": 40.0}}  # fmt: skip
    assert choose(figures) == "bf16"  # int8 is faster but costs 0.3 points
    figures["int8"]["ne"] = 9.10
    assert choose(figures) == "int8"
    figures["bf16"]["ne"] = figures["int8"]["ne"] = 9.2
    assert choose(figures) == "fp32"


def test_bf16_on_a_cpu_without_it_falls_back_to_fp32(tiny_checkpoints, monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "cpu_features", lambda: NO_BF16_NO_VNNI)
    with caplog.at_level(logging.WARNING):
        predictor = KeypointPredictor([tiny_checkpoints["a"]], device="cpu", precision="bf16")
    assert predictor.members[0].runner.precision == "fp32"
    assert "so fp32 instead" in caplog.text


def test_bf16_training_on_a_cpu_without_it_falls_back_to_32_true(monkeypatch, caplog):
    from fashionkp.inference.precision import training_precision

    monkeypatch.setattr(precision_module.torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert training_precision("bf16-mixed", "cpu", NO_BF16_NO_VNNI) == "32-true"
        assert training_precision("bf16-mixed", "auto", NO_BF16_NO_VNNI) == "32-true"
    assert "trainer.precision=bf16-mixed: this CPU (AVX2, bf16 no, VNNI no) has no AVX-512 BF16" in caplog.text
    assert training_precision("bf16-mixed", "cpu", FULL) == "bf16-mixed"
    assert training_precision("bf16-mixed", "gpu", NO_BF16_NO_VNNI) == "bf16-mixed"  # the GPU's business
    assert training_precision("32-true", "cpu", NO_BF16_NO_VNNI) == "32-true"


def test_bf16_inference_stays_close_to_fp32(tiny_checkpoints, synth_data, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_features", lambda: FULL)  # autocast bf16 runs on any CPU
    records = read_csv(synth_data["answers"])[:6]
    images, cats = [load_image(r.image_path) for r in records], [r.category for r in records]
    fp32 = KeypointPredictor([tiny_checkpoints["a"]], device="cpu", precision="fp32", backend="torch")
    bf16 = KeypointPredictor([tiny_checkpoints["a"]], device="cpu", precision="bf16")
    assert bf16.members[0].runner.precision == "bf16"
    a, b = fp32.predict_batch(images, cats), bf16.predict_batch(images, cats)
    assert not np.array_equal(a, b)  # it did run in bf16
    # within 2 input pixels (half a heatmap cell at stride 4) in photo pixels for most points
    moved = np.hypot(*(a[..., :2] - b[..., :2]).reshape(-1, 2).T)
    scale = max(load_image(records[0].image_path).shape[:2]) / 64
    assert np.nanmedian(moved) < 2 * scale


def test_an_fp32_runner_stays_fp32_inside_training_bf16_autocast(tiny_checkpoints, synth_data):
    """Validation under trainer.precision=bf16-mixed runs inside Lightning's autocast; the deployed predictor
    it scores is fp32, so an fp32 runner must switch that autocast off (else val/ne != evaluate.py's NE)."""
    import torch

    from fashionkp.inference.predictor import PhotoBatch, TorchHeatmapRunner

    records = read_csv(synth_data["answers"])[:4]
    inputs = PhotoBatch.from_images([load_image(r.image_path) for r in records]).at(64, range(4))
    runner = TorchHeatmapRunner.from_checkpoint(tiny_checkpoints["a"], torch.device("cpu"))
    plain, _ = runner(inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = runner(inputs)
        bf16, _ = TorchHeatmapRunner.from_checkpoint(tiny_checkpoints["a"], torch.device("cpu"), bf16=True)(inputs)
    assert torch.equal(inside, plain)
    assert not torch.equal(bf16, plain)  # the autocast around it is a real bf16 one


def test_int8_export_is_calibrated_qdq_with_per_channel_weights(tiny_checkpoints, synth_data, tmp_path):
    out = tmp_path / "a.int8.onnx"
    assert cli(["export", str(tiny_checkpoints["a"]), str(out), "--precision", "int8",
                "--calibration-root", str(synth_data["train"]), "--calibration-images", "12"]) == 0  # fmt: skip
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    # per-channel: a convolution weight's scale holds one value per output channel
    inits = {i.name: i for i in model.graph.initializer}
    weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weight_scales = [inits[n.input[1]] for n in weights if len(inits[n.input[0]].dims) == 4]
    assert weight_scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in weight_scales)
    info = read_info(model)
    assert info["precision"] == "int8" and info["calibration_photos"] == 12
    # The padding amounts of TF-style "same" padding are computed from shapes: quantized, they round to the wrong
    # whole pixels (the recipe's model lost 2.1 NE points), so no Q/DQ may sit on that arithmetic.
    producer = {out: n for n in model.graph.node for out in n.output}
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert pads, "the backbone has TF-style padding"
    pending, seen = [name for n in pads for name in n.input[1:]], set()
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        assert node.op_type != "QuantizeLinear", f"{node.name} quantizes padding arithmetic"
        if node.op_type != "Shape":
            pending.extend(node.input)
    assert len(seen) > 10
    records = read_csv(synth_data["answers"])
    images, cats = [load_image(r.image_path) for r in records], [r.category for r in records]
    int8 = KeypointPredictor([out], device="cpu")
    assert int8.members[0].runner.precision == "int8"
    points = int8.predict_batch(images, cats)  # the agreement with fp32 on real photos: test_real_training.py
    own = [(i, k) for i, c in enumerate(cats) for k in CATEGORY_KEYPOINTS[c]]
    assert np.isfinite([points[i, k, :2] for i, k in own]).all()


def test_calibration_uses_training_photos_only(synth_data):
    from fashionkp.data.fashionai import read_splits
    from fashionkp.data.split import split_records

    photos = calibration_photos([synth_data["train"]], 1000)
    train, val = split_records(read_splits([synth_data["train"]]), 0.2, "fashionkp")
    assert set(photos) == {r.image_path for r in train} and not set(photos) & {r.image_path for r in val}
    assert len(calibration_photos([synth_data["train"]], 5)) == 5


def test_fashionkp_precision_records_a_choice_that_auto_then_uses(tiny_checkpoints, synth_data, tmp_path, capsys):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(tiny_checkpoints["a"].read_bytes())
    assert cli(["precision", str(checkpoint), "--data-root", str(synth_data["train"]), "--calibration-images",
                "8", "--threads", "1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    record = json.loads(record_path(checkpoint).read_text())
    assert {"fp32", "int8"} <= set(record["figures"]) and record["choice"] in record["figures"]
    assert f"precision=auto now runs {checkpoint} in {record['choice']}" in out
    assert record["choice"] == choose(record["figures"])
    predictor = KeypointPredictor([checkpoint], device="cpu")  # precision=auto
    assert predictor.members[0].runner.precision == record["choice"]
    # a record made for another version of the file is not trusted
    record["checkpoint_size"] += 1
    record_path(checkpoint).write_text(json.dumps(record))
    assert KeypointPredictor([checkpoint], device="cpu").members[0].runner.precision == "fp32"


def test_int8_without_calibration_says_how_to_get_it(tiny_checkpoints):
    with pytest.raises(ValueError, match="has no int8 model yet.*calibration_root"):
        KeypointPredictor([tiny_checkpoints["b"]], device="cpu", precision="int8")


def _onnx_info(path) -> dict:
    return read_info(onnx.load(str(path)))


def test_export_writes_the_measured_choice_into_the_file(tiny_checkpoints, synth_data, tmp_path, capsys, caplog):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(tiny_checkpoints["a"].read_bytes())
    # never measured: fp32, and it says how to measure
    assert cli(["export", str(checkpoint), str(tmp_path / "plain.onnx")]) == 0
    assert "no valid measurement of" in capsys.readouterr().out
    assert _onnx_info(tmp_path / "plain.onnx")["precision"] == "fp32"
    assert _onnx_info(tmp_path / "plain.onnx")["precision_choice"] is None
    # a record (as `fashionkp precision` writes it) where int8 costs 0.05 points for twice the speed
    int8_file = cached_onnx(checkpoint, tmp_path / "cache", calibration_photos([synth_data["train"]], 8))
    figures = {"fp32": {"ne": 9.00, "ms_per_image": 10.0}, "bf16": {"ne": 9.02, "ms_per_image": 8.0},
               "int8": {"ne": 9.05, "ms_per_image": 5.0}}  # fmt: skip
    record = {"checkpoint": str(checkpoint), "checkpoint_size": checkpoint.stat().st_size, "choice": "int8",
              "tolerance_points": 0.1, "figures": figures, "validation_images": 40, "calibration_photos": 8,
              "threads": 2, "cpu": "AVX-512, bf16 yes, VNNI yes", "int8_onnx": str(int8_file),
              "int8_scheme": INT8_SCHEME, "unit": "%"}  # fmt: skip
    record_path(checkpoint).write_text(json.dumps(record))
    out = tmp_path / "model.onnx"
    assert cli(["export", str(checkpoint), str(out)]) == 0
    assert "precision=auto: int8, measured on 40 validation photos: NE 9.05% vs fp32 9.00%" in capsys.readouterr().out
    info = _onnx_info(out)
    assert info["precision"] == "int8" and info["precision_choice"]["figures"] == figures
    assert "int8_onnx" not in info["precision_choice"]  # no path of this machine's cache in a file that travels
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("QuantizeLinear") > 10
    with caplog.at_level(logging.INFO):
        runner = OnnxHeatmapRunner(out)
    assert runner.precision == "int8"
    assert "model.onnx: int8, measured on 40 validation photos: NE 9.05% vs fp32 9.00%, 5.0 vs 10.0 ms" in caplog.text
    # told int8 without calibration photos: the measured file, with its measurement
    assert cli(["export", str(checkpoint), str(tmp_path / "told.onnx"), "--precision", "int8"]) == 0
    assert _onnx_info(tmp_path / "told.onnx")["precision_choice"]["choice"] == "int8"
    # told int8 with calibration photos: a new file, whose NE nobody measured
    assert cli(["export", str(checkpoint), str(tmp_path / "new.onnx"), "--precision", "int8", "--calibration-root",
                str(synth_data["train"]), "--calibration-images", "4"]) == 0  # fmt: skip
    assert _onnx_info(tmp_path / "new.onnx")["precision_choice"] is None
    # the measured int8 file gone from the cache: said, with what to do, and no file written
    int8_file.unlink()
    capsys.readouterr()
    assert cli(["export", str(checkpoint), str(tmp_path / "gone.onnx")]) == 2
    assert "has no measured int8 file (`fashionkp precision` makes one)" in capsys.readouterr().err
    assert not (tmp_path / "gone.onnx").exists()
    # ... unless calibration photos are given: a new int8 file, said to be unmeasured, with no figures
    assert cli(["export", str(checkpoint), str(tmp_path / "gone.onnx"), "--calibration-root", str(synth_data["train"]),
                "--calibration-images", "4"]) == 0  # fmt: skip
    assert "the measured int8 file is gone; a new one is calibrated" in capsys.readouterr().out
    assert _onnx_info(tmp_path / "gone.onnx")["precision"] == "int8"
    assert _onnx_info(tmp_path / "gone.onnx")["precision_choice"] is None
    # where bf16 (PyTorch only) would be the fastest, the file holds the fastest ONNX precision within 0.1 points
    figures["bf16"]["ms_per_image"], figures["int8"]["ne"] = 2.0, 9.5
    record_path(checkpoint).write_text(json.dumps({**record, "choice": "bf16"}))
    assert cli(["export", str(checkpoint), str(out)]) == 0
    assert _onnx_info(out)["precision"] == "fp32" and _onnx_info(out)["precision_choice"]["choice"] == "bf16"
    assert not list(tmp_path.glob(".*.tmp"))  # no leftovers of the export


def test_export_in_bf16_says_where_bf16_runs(tiny_checkpoints, tmp_path, capsys):
    assert onnxruntime_bf16_error() is not None  # onnxruntime's CPU provider has no bf16 arithmetic
    assert cli(["export", str(tiny_checkpoints["a"]), str(tmp_path / "m.onnx"), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "refuses a bf16 convolution on CPU" in err and "PyTorch autocast" in err and "precision=bf16" in err
    assert "Traceback" not in err and not (tmp_path / "m.onnx").exists()
    assert cli(["export", str(tiny_checkpoints["a"]), str(tmp_path / "m.onnx"), "--precision", "fp16"]) == 2
    assert "--precision='fp16': not a valid choice" in capsys.readouterr().err


def test_the_predictor_says_which_instruction_sets_it_found(tiny_checkpoints, caplog):
    with caplog.at_level(logging.INFO):
        KeypointPredictor([tiny_checkpoints["a"]], device="cpu", backend="torch")
    assert f"CPU: {cpu_features().describe()}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a network in memory (validation inside training): nothing to say
        KeypointPredictor([TorchHeatmapRunner.from_checkpoint(tiny_checkpoints["a"], torch.device("cpu"))])
    assert "CPU:" not in caplog.text
