import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir

from fashionkp.cli import main as cli
from fashionkp.data.fashionai import read_csv
from fashionkp.data.keypoints import CATEGORIES, CATEGORY_KEYPOINTS
from fashionkp.data.submission import read_submission
from fashionkp.evaluation.evaluate import evaluate
from fashionkp.inference.checkpoint import CheckpointError, load_checkpoint
from fashionkp.inference.predict import predict
from fashionkp.inference.predictor import KeypointPredictor


def _compose(name: str, overrides: list[str]):
    import fashionkp.training.train  # noqa: F401  (resolvers)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def main_score(answers, submission, tmp_path) -> float:
    assert cli(["score", str(answers), str(submission), "--json", str(tmp_path / "score.json")]) == 0
    return json.loads((tmp_path / "score.json").read_text())["ne"]


def test_python_api_gives_points_in_original_pixels(tiny_checkpoints, synth_data):
    predictor = KeypointPredictor([tiny_checkpoints["a"]], device="cpu")
    record = read_csv(synth_data["answers"])[0]
    points = predictor.predict(record.image_path, record.category)
    own = list(CATEGORY_KEYPOINTS[record.category])
    assert points.shape == (24, 3)
    assert np.isfinite(points[own]).all() and np.isnan(np.delete(points, own, axis=0)).all()
    from fashionkp.data.images import load_image

    h, w = load_image(record.image_path).shape[:2]
    assert (points[own, 0] >= 0).all() and (points[own, 0] <= w - 1).all() and (points[own, 1] <= h - 1).all()
    assert predictor.categories == list(CATEGORY_KEYPOINTS)


def test_predict_writes_a_submission_that_score_reads_and_evaluate_agrees(
    tiny_checkpoints, synth_data, tmp_path, capsys
):
    ckpt = str(tiny_checkpoints["a"])
    cfg = _compose("predict", [f"checkpoints=[{ckpt}]", f"test_csv={synth_data['test_csv']}",
                               f"output_dir={tmp_path / 'pred'}", "num_workers=0", "draw=4"])  # fmt: skip
    summary = predict(cfg)
    assert summary["images"] == 10 and summary["failed"] == 0
    assert Path(summary["drawn"]).is_file()
    capsys.readouterr()
    assert cli(["score", str(synth_data["answers"]), summary["submission"], "--json", str(tmp_path / "s.json")]) == 0
    scored = json.loads((tmp_path / "s.json").read_text())["ne"]
    ev = _compose("evaluate", [f"checkpoints=[{ckpt}]", f"data.root={synth_data['answers']}", "split=all",
                               f"output_dir={tmp_path / 'eval'}", "num_workers=0", "draw_worst=2"])  # fmt: skip
    result = evaluate(ev)
    assert 100 * result.ne == pytest.approx(scored, abs=1e-6)  # files hold percent
    for name in ("metrics.json", "ne_per_keypoint.png", "worst.jpg", "predictions.csv"):
        assert (tmp_path / "eval" / name).is_file()
    # the evaluated images as a test list, predicted again with image ids relative to their split folder
    again = _compose("predict", [f"checkpoints=[{ckpt}]", f"test_csv={tmp_path / 'eval' / 'test.csv'}",
                                 f"image_root={synth_data['test']}", f"output_dir={tmp_path / 'pred2'}",
                                 "num_workers=0", "draw=0"])  # fmt: skip
    second = predict(again)
    assert main_score(tmp_path / "eval" / "answers.csv", second["submission"], tmp_path) == pytest.approx(
        scored, abs=1e-6
    )


def test_flip_test_and_ensembles_of_different_sizes(tiny_checkpoints, synth_data):
    records = read_csv(synth_data["answers"])
    from fashionkp.data.images import load_image

    images, cats = [load_image(r.image_path) for r in records], [r.category for r in records]
    a, b = tiny_checkpoints["a"], tiny_checkpoints["b"]
    assert load_checkpoint(a).input_size != load_checkpoint(b).input_size
    plain = KeypointPredictor([a], device="cpu", flip_test=False).predict_batch(images, cats)
    flipped = KeypointPredictor([a], device="cpu", flip_test=True).predict_batch(images, cats)
    assert not np.allclose(plain, flipped, equal_nan=True)
    twice = KeypointPredictor([a, a], device="cpu").predict_batch(images, cats)
    assert np.allclose(twice, flipped, equal_nan=True)  # averaging identical members changes nothing
    alone_b = KeypointPredictor([b], device="cpu").predict_batch(images, cats)
    # b has the finer grid, so the ensemble decodes on b's grid: a zero weight on a removes it exactly
    only_b = KeypointPredictor([a, b], weights=[0.0, 1.0], device="cpu").predict_batch(images, cats)
    assert np.allclose(only_b, alone_b, equal_nan=True)
    both = KeypointPredictor([a, b], device="cpu").predict_batch(images, cats)
    assert not np.allclose(both, alone_b, equal_nan=True)
    # two equal scales average identical heatmaps; another scale changes the points (the exact geometry of
    # multi-scale test is checked with a perfect model in test_one_path.py)
    same = KeypointPredictor([a], device="cpu", scales=[1.0, 1.0]).predict_batch(images, cats)
    np.testing.assert_allclose(same, flipped, atol=1e-4)
    multi = KeypointPredictor([a], device="cpu", scales=[1.0, 1.5]).predict_batch(images, cats)
    assert not np.allclose(multi, flipped, equal_nan=True)


def test_onnx_export_matches_pytorch(tiny_checkpoints, synth_data, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert cli(["export", str(tiny_checkpoints["a"]), str(out)]) == 0
    from fashionkp.inference.predictor import OnnxHeatmapRunner, TorchHeatmapRunner

    images = (np.random.default_rng(0).random((3, 3, 64, 64)) * 255).astype(np.float32)
    torch_hm, torch_types = TorchHeatmapRunner.from_checkpoint(tiny_checkpoints["a"], torch.device("cpu"))(images)
    onnx_hm, onnx_types = OnnxHeatmapRunner(out)(images)  # batch of 3 through a graph traced with batch 1
    assert torch.allclose(torch_hm, onnx_hm, atol=1e-4)
    # a clothes=all model's garment-type head is the export's second output: probabilities
    assert torch.allclose(torch_types, onnx_types, atol=1e-5) and torch.allclose(onnx_types.sum(1), torch.ones(3))
    records = read_csv(synth_data["answers"])
    from fashionkp.data.images import load_image

    imgs, cats = [load_image(r.image_path) for r in records], [r.category for r in records]
    p_torch = KeypointPredictor([tiny_checkpoints["a"]], device="cpu", backend="torch").predict_batch(imgs, cats)
    p_onnx = KeypointPredictor([out]).predict_batch(imgs, cats)
    assert np.allclose(p_torch[..., :2], p_onnx[..., :2], atol=0.05, equal_nan=True)
    # the default CPU path exports once to a cache and runs onnxruntime, multi-scale included
    from fashionkp.inference.predictor import OnnxHeatmapRunner as Ort

    auto = KeypointPredictor([tiny_checkpoints["a"]], device="cpu")
    assert isinstance(auto.members[0].runner, Ort)
    assert np.allclose(auto.predict_batch(imgs, cats)[..., :2], p_torch[..., :2], atol=0.05, equal_nan=True)
    multi_torch = KeypointPredictor([tiny_checkpoints["a"]], device="cpu", backend="torch", scales=[1.0, 1.5])
    multi_onnx = KeypointPredictor([tiny_checkpoints["a"]], device="cpu", scales=[1.0, 1.5])
    assert np.allclose(multi_torch.predict_batch(imgs, cats)[..., :2], multi_onnx.predict_batch(imgs, cats)[..., :2],
                       atol=0.05, equal_nan=True)  # fmt: skip


def test_a_model_is_predicted_at_the_test_scales_it_was_trained_with(tiny_checkpoints, synth_data, tmp_path):
    """model.test_scales travel in the checkpoint and in its ONNX export: predicting without scales= uses them
    (the same points as telling them), and scales= still wins."""
    pytest.importorskip("onnxruntime")
    from fashionkp.data.images import load_image
    from fashionkp.inference.export import export_onnx

    ckpt = torch.load(tiny_checkpoints["a"], map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["test_scales"] = [0.5, 1.0, 1.5]
    scaled = tmp_path / "scaled.ckpt"
    torch.save(ckpt, scaled)
    records = read_csv(synth_data["answers"])[:6]
    imgs, cats = [load_image(r.image_path) for r in records], [r.category for r in records]
    told = KeypointPredictor([tiny_checkpoints["a"]], device="cpu", backend="torch", scales=[0.5, 1.0, 1.5])
    own = KeypointPredictor([scaled], device="cpu", backend="torch")
    assert own.scales == own.crop_scales == (0.5, 1.0, 1.5)
    np.testing.assert_array_equal(own.predict_batch(imgs, cats), told.predict_batch(imgs, cats))
    one = KeypointPredictor([scaled], device="cpu", backend="torch", scales=[1.0])
    assert one.scales == (1.0,)
    assert not np.allclose(one.predict_batch(imgs, cats), own.predict_batch(imgs, cats), equal_nan=True)
    exported = KeypointPredictor([export_onnx(scaled, tmp_path / "scaled.onnx")])
    assert exported.scales == (0.5, 1.0, 1.5)
    assert np.allclose(exported.predict_batch(imgs, cats)[..., :2], own.predict_batch(imgs, cats)[..., :2],
                       atol=0.05, equal_nan=True)  # fmt: skip


def test_bad_inputs_are_reported_not_fatal(tiny_checkpoints, synth_data, tmp_path):
    broken = tmp_path / "split"
    broken.mkdir()
    rows = read_csv(synth_data["test_csv"])[:3]
    lines = ["image_id,image_category"] + [f"{r.image_path},{r.category}" for r in rows]
    lines.append(f"{tmp_path / 'missing.jpg'},skirt")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines.append(f"{tmp_path / 'corrupt.jpg'},dress")
    (broken / "test.csv").write_text("\n".join(lines) + "\n")
    cfg = _compose("predict", [f"checkpoints=[{tiny_checkpoints['a']}]", f"test_csv={broken / 'test.csv'}",
                               f"output_dir={tmp_path / 'out'}", "num_workers=0", "draw=0"])  # fmt: skip
    summary = predict(cfg)
    assert summary["images"] == 3 and summary["failed"] == 2 and summary["mean_shape_rows"] == 2
    assert any("missing.jpg" in f for f in summary["failures"]) and any("corrupt.jpg" in f for f in summary["failures"])
    # a row for every test image, or the scorer rejects the file: unreadable ones get the training mean shape
    submission = read_submission(summary["submission"])
    assert len(submission) == 5
    ckpt = torch.load(tiny_checkpoints["a"], map_location="cpu", weights_only=False)
    dress = CATEGORIES.index("dress")
    own = list(CATEGORY_KEYPOINTS["dress"])
    corrupt = submission[str(tmp_path / "corrupt.jpg")][1]
    assert np.allclose(corrupt[own], np.round(np.asarray(ckpt["mean_shape"])[dress, own]))


def test_checkpoint_errors_are_clear(tiny_checkpoints, tmp_path, synth_data):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(tiny_checkpoints["a"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.ckpt: cannot read checkpoint"):
        KeypointPredictor([truncated])
    with pytest.raises(CheckpointError, match="not found"):
        KeypointPredictor([tmp_path / "none.ckpt"])
    with pytest.raises(ValueError, match="2 ensemble weights for 1 checkpoints"):
        KeypointPredictor([tiny_checkpoints["a"]], weights=[1, 2])


def test_a_garment_model_refuses_other_garments(synth_data, tmp_path):
    from conftest import TINY, compose_train

    from fashionkp.training.train import train

    cfg = compose_train([*TINY, "debug=fdr", "clothes=skirt", f"data.root={synth_data['train']}",
                         "callbacks.model_checkpoint.dirpath=" + str(tmp_path)], tmp_path)  # fmt: skip
    train(cfg)
    import pytorch_lightning as pl  # fast_dev_run writes no checkpoint: save one by hand

    from fashionkp.training.train import build

    module, datamodule = build(cfg)
    trainer = pl.Trainer(max_steps=0, logger=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "skirt.ckpt")
    predictor = KeypointPredictor([tmp_path / "skirt.ckpt"], device="cpu")
    assert predictor.categories == ["skirt"]
    record = next(r for r in read_csv(synth_data["answers"]) if r.category == "dress")
    with pytest.raises(ValueError, match=r"no model for garment type 'dress'.*\['skirt'\]"):
        predictor.predict(record.image_path, "dress")
