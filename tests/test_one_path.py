"""The house rules: one prediction path (validation == evaluate.py), old checkpoints still load, exact flip and
multi-scale geometry, and an import graph that runs one way."""

import ast
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, TINY, compose_train
from hydra import compose, initialize_config_dir

from fashionkp.config import CONFIG_DIR
from fashionkp.data.codec import HeatmapCodec
from fashionkp.data.keypoints import CATEGORY_KEYPOINTS, NUM_KEYPOINTS, channels_for, flip_permutation
from fashionkp.data.transforms import FILL_VALUE, apply_affine, letterbox_matrix
from fashionkp.evaluation.evaluate import evaluate
from fashionkp.inference.checkpoint import load_checkpoint
from fashionkp.inference.predictor import KeypointPredictor
from fashionkp.training.train import train

PACKAGE = ROOT / "fashionkp"
#: The modules that hold command-line entry points: none may import another.
CLI_MODULES = {"fashionkp.commands", "fashionkp.cli", "fashionkp.demo"}


def test_val_ne_of_a_checkpoint_equals_evaluate_py(synth_data, tmp_path):
    """The NE that selects checkpoints is the deployed predictor's: both score the whole-pixel points a submission
    holds (rounded half to even), through the same KeypointPredictor, on the same split."""
    run = tmp_path / "run"
    cfg = compose_train([*TINY, "clothes=all", f"data.root={synth_data['train']}", "trainer.max_epochs=1",
                         "validate_best=true", "data.val_fraction=0.3"], run)  # fmt: skip
    result = train(cfg)
    best = json.loads((run / "val_ne_best.json").read_text())
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        eval_cfg = compose("evaluate", overrides=[
            f"checkpoints=[{result['best_checkpoint']}]", f"data.root={synth_data['train']}", "data.val_fraction=0.3",
            f"output_dir={tmp_path / 'eval'}", "backend=torch", "channels_last=false", "device=cpu",
            "batch_size=4", "num_workers=0", "draw_worst=0", "round=true",
        ])  # fmt: skip
    scored = evaluate(eval_cfg).as_dict()
    assert scored["counted"] == best["counted"] and scored["counted_per_category"] == best["counted_per_category"]
    assert scored["ne"] == pytest.approx(best["ne"], rel=1e-6, abs=1e-9)
    assert scored["per_category"] == pytest.approx(best["per_category"], rel=1e-6, abs=1e-9)
    assert scored["per_keypoint"] == pytest.approx(best["per_keypoint"], rel=1e-6, abs=1e-9)
    assert result["best_val_ne"] == pytest.approx(scored["ne"], rel=1e-6)


def test_an_onnx_file_from_before_the_codec_still_loads(tiny_checkpoints, tmp_path):
    """Exports from before the codec was one object hold only ``decode_sigma`` in their metadata."""
    from fashionkp.inference.export import export_onnx
    from fashionkp.inference.predictor import OnnxHeatmapRunner

    path = export_onnx(tiny_checkpoints["a"], tmp_path / "new.onnx")
    model = onnx.load(str(path))
    info = json.loads(model.metadata_props[0].value)
    old = {k: v for k, v in info.items() if k not in ("codec", "format")} | {
        "decode_sigma": info["codec"]["decode_sigma"]
    }
    model.metadata_props[0].value = json.dumps(old)
    onnx.save(model, str(tmp_path / "old.onnx"))
    runner = OnnxHeatmapRunner(tmp_path / "old.onnx")
    assert runner.codec == OnnxHeatmapRunner(path).codec.__class__(**{**info["codec"], "sigma": 2 * info["codec"][
        "decode_sigma"], "global_sigma": 2 * info["codec"]["decode_sigma"]})  # fmt: skip


def test_a_checkpoint_from_before_the_codec_still_loads(tiny_checkpoints, synth_data, tmp_path):
    """Checkpoints written before the codec was one object kept decoder and decode_sigma among the model's
    hyper-parameters: they load, decode as they did, and predict exactly what the upgraded file predicts."""
    ckpt = torch.load(tiny_checkpoints["a"], map_location="cpu", weights_only=False)
    hp = dict(ckpt["hyper_parameters"])
    codec = hp.pop("codec")
    hp.update(decoder="seed", decode_sigma=codec["decode_sigma"])  # the old layout and the old decoder name
    ckpt["hyper_parameters"] = hp
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    trained = load_checkpoint(old)
    assert trained.codec.decoder == "quarter_offset" and trained.codec.decode_sigma == codec["decode_sigma"]
    assert trained.codec.stride == 4
    image = np.asarray(
        __import__("fashionkp.data.images", fromlist=["load_image"]).load_image(
            next((synth_data["train"] / "Images" / "dress").glob("*.jpg"))
        )
    )
    from_old = KeypointPredictor([old], device="cpu", backend="torch").predict(image, "dress")
    from_new = KeypointPredictor([tiny_checkpoints["a"]], device="cpu", backend="torch", decoder="quarter_offset")
    np.testing.assert_array_equal(from_old, from_new.predict(image, "dress"))


class OracleRunner:
    """A perfect 'model' of one photo: the codec's target heatmaps of the photo's true points at whatever input size
    it is given, mirrored (with left/right channels swapped) when the input is the mirrored photo."""

    def __init__(self, photo_points: np.ndarray, photo_size: tuple[int, int], clothes: str, input_size: int):
        self.points, self.size, self.clothes, self.input_size = photo_points, photo_size, clothes, input_size
        self.codec = HeatmapCodec(stride=4, sigma=2.0, global_sigma=2.0, decoder="dark", decode_sigma=1.0,
                                  include_occluded=True)  # fmt: skip
        self.mean_shape, self.path = None, "<oracle>"
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, inputs) -> torch.Tensor:
        inputs = np.asarray(inputs)
        side = inputs.shape[-1]
        # The photo is taller than wide: the letterbox pads on the right, so a mirrored input starts with padding.
        mirrored = bool((inputs[0, :, :, 0] == np.array(FILL_VALUE)[:, None]).all())
        self.calls.append((side, mirrored))
        points = apply_affine(self.points, letterbox_matrix(*self.size, side))
        channels = list(channels_for(self.clothes))
        points = points[channels]
        if mirrored:
            points = points[list(flip_permutation(self.clothes))]
            points[:, 0] = side - 1 - points[:, 0]
        maps = self.codec.encode(points, np.ones(len(points)), side)["target"]
        return torch.from_numpy(maps)[None]


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 1.5), (0.75, 1.0, 1.25)])
def test_flip_test_and_multi_scale_recover_a_perfect_models_points_exactly(scales):
    """Every pass (each scale, plain and mirrored) must land on the same photo points: a shifted mirror, a wrong
    letterbox inverse or a misaligned grid between scales moves them by whole pixels. (The oracle swaps left and
    right with the code's own permutation, which test_keypoints.py checks against a hand-written table.)"""
    h, w, clothes = 400, 300, "blouse"
    rng = np.random.default_rng(0)
    photo = np.full((NUM_KEYPOINTS, 2), np.nan)
    own = list(CATEGORY_KEYPOINTS[clothes])
    photo[own] = np.c_[rng.uniform(40, w - 40, len(own)), rng.uniform(40, h - 40, len(own))]
    oracle = OracleRunner(photo, (h, w), "all", 128)
    image = np.full((h, w, 3), 200, np.uint8)
    points = KeypointPredictor([oracle], flip_test=True, scales=scales).predict(image, clothes)
    assert {mirrored for _, mirrored in oracle.calls} == {False, True}
    assert {side for side, _ in oracle.calls} == {int(round(128 * s / 32)) * 32 for s in scales}
    # a perfect model's points survive the whole path to within a tenth of a photo pixel
    assert np.abs(points[own, :2] - photo[own]).max() < 0.1
    assert np.isnan(np.delete(points, own, axis=0)).all()


def _imports(path: Path) -> set[str]:
    """Every fashionkp module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fashionkp"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fashionkp"))
    return found


def test_the_import_graph_runs_one_way():
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")
    }
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    # no cycle (function-level imports included): repeatedly remove modules that import nothing left
    remaining = dict(graph)
    while remaining:
        leaves = [m for m, deps in remaining.items() if not deps & remaining.keys()]
        assert leaves, f"import cycle among {sorted(remaining)}"
        for leaf in leaves:
            del remaining[leaf]
    for cli in CLI_MODULES:
        assert not graph[cli] & (CLI_MODULES - {cli}), f"{cli} imports another command-line module"
    # the stages import only earlier stages
    order = ["data", "models", "inference", "evaluation", "training"]
    for name, deps in graph.items():
        stage = name.split(".")[1] if name.count(".") >= 1 else ""
        if stage in order:
            for dep in deps:
                dep_stage = dep.split(".")[1]
                if dep_stage in order:
                    assert order.index(dep_stage) <= order.index(stage), f"{name} imports the later stage {dep}"
