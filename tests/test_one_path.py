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
from fashionkp.data.keypoints import CATEGORIES, CATEGORY_KEYPOINTS, NUM_KEYPOINTS, channels_for, flip_permutation
from fashionkp.data.transforms import FILL_VALUE, apply_affine, letterbox_matrix
from fashionkp.errors import ConfigError
from fashionkp.evaluation.evaluate import evaluate
from fashionkp.inference.checkpoint import load_checkpoint
from fashionkp.inference.precision import read_info, set_info
from fashionkp.inference.predictor import KeypointPredictor
from fashionkp.training.train import train

PACKAGE = ROOT / "fashionkp"
#: The modules that hold command-line entry points: none may import another.
CLI_MODULES = {"fashionkp.commands", "fashionkp.cli", "fashionkp.demo"}


@pytest.mark.parametrize(
    ("two_pass", "test_scales", "type_input", "ema_decay", "crop_passes"),
    [(False, [1.0], False, None, 1), (True, [1.0], False, None, 1), (False, [0.5, 1.0, 1.5], False, None, 1),
     (True, [0.5, 1.0, 1.5], False, None, 1), (True, [1.0], True, None, 1), (True, [1.0], False, 0.9, 1),
     (True, [1.0], False, None, 2)],
)  # fmt: skip
def test_val_ne_of_a_checkpoint_equals_evaluate_py(
    synth_data, tmp_path, two_pass, test_scales, type_input, ema_decay, crop_passes
):
    """The NE that selects checkpoints is the deployed predictor's: both score the whole-pixel points a submission
    holds (rounded half to even), through the same KeypointPredictor, on the same split; with two passes and test
    scales too (evaluate.py follows the checkpoint's model.two_pass and model.test_scales), the network told each
    photo's garment type too, with two crop passes (model.crop_passes), and with a moving average of the weights
    (validated and saved in their place); the type head's confusion matrix is the same."""
    run = tmp_path / "run"
    passes = [f"model.two_pass={two_pass}", "augmentation.crop=0.5", f"model.test_scales={test_scales}",
              f"model.garment_type_input={type_input}", f"model.ema_decay={ema_decay or 'null'}",
              f"model.crop_passes={crop_passes}"]  # fmt: skip
    cfg = compose_train([*TINY, "clothes=all", f"data.root={synth_data['train']}", "trainer.max_epochs=1",
                         "validate_best=true", "data.val_fraction=0.3", *passes], run)  # fmt: skip
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
    assert load_checkpoint(result["best_checkpoint"]).crop_margin == (0.15 if two_pass else None)
    assert load_checkpoint(result["best_checkpoint"]).scales == tuple(test_scales)
    assert load_checkpoint(result["best_checkpoint"]).crop_passes == crop_passes
    if ema_decay:  # validated and saved: the average, not the trained weights
        saved = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=False)
        trained = saved["current_model_state"]
        assert any(not torch.allclose(v, trained[k]) for k, v in saved["state_dict"].items() if v.is_floating_point())
    if type_input:  # trained away from its zero start
        assert load_checkpoint(result["best_checkpoint"]).model.type_input.table.weight.abs().sum() > 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["scales"] == test_scales and metrics["crop_scales"] == (test_scales if two_pass else None)
    assert metrics["crop_passes"] == (crop_passes if two_pass else 0)
    assert metrics["garment_types"] == best["garment_types"]
    assert result["best_type_accuracy"] == best["garment_types"]["accuracy"]


def test_an_onnx_file_from_before_the_codec_still_loads(tiny_checkpoints, tmp_path):
    """Exports from before the codec was one object hold only ``decode_sigma`` in their metadata."""
    from fashionkp.inference.export import export_onnx
    from fashionkp.inference.predictor import OnnxHeatmapRunner

    path = export_onnx(tiny_checkpoints["a"], tmp_path / "new.onnx")
    model = onnx.load(str(path))
    info = read_info(model)
    old = {k: v for k, v in info.items() if k not in ("codec", "format", "test_scales")} | {
        "decode_sigma": info["codec"]["decode_sigma"]
    }
    set_info(model, old)
    onnx.save(model, str(tmp_path / "old.onnx"))
    runner = OnnxHeatmapRunner(tmp_path / "old.onnx")
    assert runner.scales == (1.0,)  # files from before test scales were saved: one scale, as they were used
    assert runner.codec == OnnxHeatmapRunner(path).codec.__class__(**{**info["codec"], "sigma": 2 * info["codec"][
        "decode_sigma"], "global_sigma": 2 * info["codec"]["decode_sigma"]})  # fmt: skip


def test_a_checkpoint_from_before_the_codec_still_loads(tiny_checkpoints, synth_data, tmp_path):
    """Checkpoints written before the codec was one object kept decoder and decode_sigma among the model's
    hyper-parameters: they load, decode as they did, and predict exactly what the upgraded file predicts."""
    ckpt = torch.load(tiny_checkpoints["a"], map_location="cpu", weights_only=False)
    hp = dict(ckpt["hyper_parameters"])
    codec = hp.pop("codec")
    hp.pop("test_scales")
    hp.update(decoder="seed", decode_sigma=codec["decode_sigma"])  # the old layout and the old decoder name
    ckpt["hyper_parameters"] = hp
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    trained = load_checkpoint(old)
    assert trained.codec.decoder == "quarter_offset" and trained.codec.decode_sigma == codec["decode_sigma"]
    assert trained.codec.stride == 4 and trained.scales == (1.0,)
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
        self.mean_shape, self.path, self.crop_margin, self.has_type_head = None, "<oracle>", None, False
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, inputs) -> tuple[torch.Tensor, None]:
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
        return torch.from_numpy(maps)[None], None


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
    # the server runs trained models (inference) and is started by the fashionkp command only
    for name, deps in graph.items():
        if name.startswith("fashionkp.serving"):
            assert not {d.split(".")[1] for d in deps} & {"evaluation", "training", "commands", "demo"}, name
        elif any(d.startswith("fashionkp.serving") for d in deps):
            assert name == "fashionkp.cli", f"{name} imports the server"


class CoordinateOracle:
    """A perfect 'model' that sees where it looks: its photo paints each pixel's own coordinates (red = x,
    green = y, blue = 0), so the input alone tells which part of the photo it shows and whether it is mirrored,
    whatever frame (letterbox or crop), scale or flip the predictor chose. It answers the codec's targets of the
    photo's true points there, and, as a clothes=all model with a type head, fixed type probabilities."""

    def __init__(self, photo_points: np.ndarray, input_size: int, types: np.ndarray | None = None):
        self.points, self.clothes, self.input_size, self.types = photo_points, "all", input_size, types
        self.codec = HeatmapCodec(stride=4, sigma=2.0, global_sigma=2.0, decoder="dark", decode_sigma=1.0,
                                  include_occluded=True)  # fmt: skip
        self.mean_shape, self.path, self.crop_margin = None, "<oracle>", None
        self.has_type_head = types is not None
        self.frames: list[np.ndarray] = []

    @staticmethod
    def photo(height: int, width: int) -> np.ndarray:
        assert max(height, width) <= 256  # coordinates must fit in a byte
        y, x = np.mgrid[:height, :width]
        return np.dstack([x, y, np.zeros_like(x)]).astype(np.uint8)

    def _input_to_photo(self, image: np.ndarray) -> np.ndarray:
        """The 2x3 affine from input pixels to photo pixels, fitted on the pixels that show only the photo."""
        inside = image[2] == 0  # the grey fill and pixels blended with it have blue > 0
        inside &= (image[0] > 0) & (image[1] > 0)  # (and the photo's own border rows, where blending is one-sided)
        rows, cols = np.nonzero(inside)
        design = np.c_[cols, rows, np.ones(len(rows))]
        coef_x = np.linalg.lstsq(design, image[0][inside].astype(float), rcond=None)[0]
        coef_y = np.linalg.lstsq(design, image[1][inside].astype(float), rcond=None)[0]
        return np.stack([coef_x, coef_y])

    def __call__(self, inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = np.asarray(inputs)
        side = inputs.shape[-1]
        maps = []
        for image in inputs:
            to_photo = self._input_to_photo(image)
            self.frames.append(to_photo)
            points = apply_affine(self.points, np.linalg.inv(np.vstack([to_photo, [0, 0, 1]]))[:2])
            if to_photo[0, 0] < 0:  # mirrored: the network's channels swap left and right
                points = points[list(flip_permutation(self.clothes))]
            maps.append(self.codec.encode(points, np.ones(len(points)), side)["target"])
        types = None if self.types is None else torch.from_numpy(np.tile(self.types, (len(inputs), 1))).float()
        return torch.from_numpy(np.stack(maps)), types


@pytest.mark.parametrize(("scales", "crop_scales"), [((1.0,), None), ((1.0, 1.5), None), ((1.0,), (1.5,))])
def test_two_passes_recover_a_perfect_models_points_exactly(scales, crop_scales):
    """The crop pass sees the photo through another frame: a wrong crop matrix or a wrong inverse moves the
    points by whole pixels. A perfect model's points must come back through both passes, flip test and
    scales included, and the second pass must look at a zoomed crop around them (at its own scales when given)."""
    h, w, clothes = 240, 200, "trousers"
    rng = np.random.default_rng(1)
    photo = np.full((NUM_KEYPOINTS, 2), np.nan)
    own = list(CATEGORY_KEYPOINTS[clothes])
    photo[own] = np.c_[rng.uniform(70, 130, len(own)), rng.uniform(60, 160, len(own))]
    oracle = CoordinateOracle(photo, 96)
    predictor = KeypointPredictor(
        [oracle], flip_test=True, scales=scales, two_pass=True, crop_margin=0.2, crop_scales=crop_scales
    )
    points = predictor.predict(CoordinateOracle.photo(h, w), clothes)
    assert np.abs(points[own, :2] - photo[own]).max() < 0.1
    # pass 1 saw the letterbox (a 240-px frame), pass 2 a crop of the points' box grown by 0.2 on each side
    sizes = [int(round(96 * s / 32)) * 32 for s in scales]
    crop_sizes = [int(round(96 * s / 32)) * 32 for s in crop_scales or scales]
    crop_side = 1.4 * np.ptp(photo[own], axis=0).max()
    expected = [size / 240 for size in sizes] + [size / crop_side for size in crop_sizes]
    seen = [1 / np.hypot(*m[:, 0]) for m in oracle.frames]  # input pixels per photo pixel
    # (within 1%: the crop is placed from pass 1's points, a tenth of a pixel off the true ones)
    assert all(min(abs(z / e - 1) for e in expected) < 0.01 for z in seen)
    assert all(min(abs(z / e - 1) for z in seen) < 0.01 for e in expected)


class ShiftingOracle(CoordinateOracle):
    """A CoordinateOracle whose answers on crops (not on the letterbox) are off by ``shifts[k]`` photo pixels on the
    k-th crop pass (its plain and mirrored inputs alike), so that each crop pass's own points can be told apart."""

    def __init__(self, photo_points: np.ndarray, input_size: int, letterbox_side: float, shifts: list[float]):
        super().__init__(photo_points, input_size)
        self.truth, self.letterbox_zoom = photo_points, input_size / letterbox_side
        self.shifts, self.crop_calls = shifts, 0

    def __call__(self, inputs):
        zoom = 1 / np.hypot(*self._input_to_photo(np.asarray(inputs)[0])[:, 0])  # input pixels per photo pixel
        shift = 0.0
        if abs(zoom / self.letterbox_zoom - 1) > 0.01:  # a crop
            shift = self.shifts[self.crop_calls // 2]  # (the plain input, then the mirrored one)
            self.crop_calls += 1
        self.points = self.truth + shift
        return super().__call__(inputs)


def test_crop_passes_each_look_around_the_previous_points_and_are_averaged():
    """crop_passes=2: a second crop pass around the first crop pass's points, the two passes' points averaged. An
    oracle 2 px off one way on the first crop and 2 px the other way on the second: each crop pass alone is 2 px off,
    their average exact; the second crop is centred on the first crop pass's points (2 px off the first crop's)."""
    h, w, clothes = 240, 200, "skirt"
    own = list(CATEGORY_KEYPOINTS[clothes])
    truth = np.full((NUM_KEYPOINTS, 2), np.nan)
    truth[own] = np.c_[np.linspace(70, 130, len(own)), np.linspace(60, 160, len(own))]
    image = CoordinateOracle.photo(h, w)
    oracle = ShiftingOracle(truth, 96, 240, [2.0, -2.0])
    points = KeypointPredictor([oracle], flip_test=True, two_pass=True, crop_margin=0.2, crop_passes=2).predict(
        image, clothes
    )
    assert oracle.crop_calls == 4  # two crop passes, each plain and mirrored
    assert np.abs(points[own, :2] - truth[own]).max() < 0.25
    # the three frames (letterbox, first crop, second crop) of the plain inputs: the second crop's centre follows the
    # first crop pass's points, 2 px off in x and y
    centres = [to_photo @ [47.5, 47.5, 1] for to_photo in oracle.frames[::2]]  # each input's centre in the photo
    np.testing.assert_allclose(centres[1] + 2.0, centres[2], atol=0.3)
    one = ShiftingOracle(truth, 96, 240, [2.0])
    alone = KeypointPredictor([one], flip_test=True, two_pass=True, crop_margin=0.2).predict(image, clothes)
    assert one.crop_calls == 2 and np.abs(alone[own, :2] - (truth[own] + 2.0)).max() < 0.25
    with pytest.raises(ConfigError, match=r"crop_passes=0: the number of crop passes"):
        KeypointPredictor([one], two_pass=True, crop_margin=0.2, crop_passes=0)


def test_crop_passes_without_the_crop_pass_are_warned_about(caplog):
    """crop_passes= on a one-pass predictor changes nothing: said, and no crop pass runs."""
    truth = np.full((NUM_KEYPOINTS, 2), np.nan)
    truth[list(CATEGORY_KEYPOINTS["skirt"])] = 100.0
    oracle = ShiftingOracle(truth, 96, 240, [2.0, -2.0])
    predictor = KeypointPredictor([oracle], two_pass=False, crop_passes=2)
    assert predictor.crop_passes == 0
    assert "crop_passes=2: ignored, the models run one pass" in caplog.text
    predictor.predict(CoordinateOracle.photo(240, 200), "skirt")
    assert oracle.crop_calls == 0


def test_a_dedicated_crop_pass_model_sees_only_the_crops_and_gives_the_points():
    """fine_checkpoints: pass 1 (a coarse model, its points 3 px off) finds the crop, the fine model alone looks at
    it and its points come back exactly; without it the crop pass runs the coarse model again."""
    h, w, clothes = 240, 200, "skirt"
    own = list(CATEGORY_KEYPOINTS[clothes])
    truth = np.full((NUM_KEYPOINTS, 2), np.nan)
    truth[own] = np.c_[np.linspace(70, 130, len(own)), np.linspace(60, 160, len(own))]
    image = CoordinateOracle.photo(h, w)
    coarse, fine = CoordinateOracle(truth + 3.0, 96), CoordinateOracle(truth, 96)
    predictor = KeypointPredictor([coarse], fine_checkpoints=[fine], two_pass=True, crop_margin=0.2)
    points = predictor.predict(image, clothes)
    assert np.abs(points[own, :2] - truth[own]).max() < 0.25  # (DARK near a crop's edge: a tenth of a pixel)
    letterbox = 96 / 240  # input pixels per photo pixel
    assert coarse.frames and all(abs(np.hypot(*m[:, 0]) * letterbox - 1) < 0.01 for m in coarse.frames)
    assert fine.frames and all(abs(np.hypot(*m[:, 0]) * letterbox - 1) > 0.2 for m in fine.frames)  # zoomed crops
    alone = KeypointPredictor([coarse], two_pass=True, crop_margin=0.2).predict(image, clothes)
    assert np.abs(alone[own, :2] - (truth[own] + 3.0)).max() < 0.25
    with pytest.raises(ConfigError, match="fine_checkpoints=.*two_pass=true"):
        KeypointPredictor([coarse], fine_checkpoints=[fine], two_pass=False)
    fine.clothes = "dress"
    with pytest.raises(ConfigError, match=r"fine_checkpoints=.*no crop-pass model for \['blouse'"):
        KeypointPredictor([coarse], fine_checkpoints=[fine], two_pass=True)


def test_a_photo_without_its_type_gets_the_type_heads_weighted_answer():
    h, w = 240, 200
    photo = np.full((NUM_KEYPOINTS, 2), 100.0)
    image = CoordinateOracle.photo(h, w)

    def probabilities(**given):  # in CATEGORIES order, the rest shared equally
        rest = (1 - sum(given.values())) / (len(CATEGORIES) - len(given))
        return np.array([given.get(c, rest) for c in CATEGORIES])

    says_blouse = CoordinateOracle(photo, 96, probabilities(blouse=0.9))
    says_dress = CoordinateOracle(photo, 96, probabilities(blouse=0.1, dress=0.6))
    # weights 1 and 3: blouse (0.9 + 0.3) / 4 = 0.3 < dress (0.025 + 1.8) / 4 = 0.456
    ensemble = KeypointPredictor([says_blouse, says_dress], weights=[1, 3], flip_test=False)
    result = ensemble.predict_photos([image, image], [None, "skirt"])
    assert result.categories == ["dress", "skirt"] and result.predicted == [True, False]
    np.testing.assert_allclose(result.type_probabilities[0], probabilities(blouse=0.3, dress=0.45625))
    # the points are the told type's: a dress's 15, none of the others
    assert np.isfinite(result.points[0, list(CATEGORY_KEYPOINTS["dress"]), 0]).all()
    assert np.isnan(np.delete(result.points[0], list(CATEGORY_KEYPOINTS["dress"]), axis=0)).all()
    assert KeypointPredictor([says_blouse], flip_test=False).predict(image)[0, 0] == pytest.approx(100, abs=0.1)
    from fashionkp.inference.predictor import GarmentTypeError

    with pytest.raises(GarmentTypeError, match="give the type"):
        KeypointPredictor([CoordinateOracle(photo, 96)]).predict(image)
