"""model.garment_type_input: a clothes=all network told each photo's garment type, through the network, ONNX (fp32
and int8), the predictor's path for photos of an unknown type and resume (validation = evaluate.py for it:
tests/test_one_path.py)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY, compose_train

from fashionkp.data.images import load_image
from fashionkp.inference.checkpoint import CheckpointError
from fashionkp.inference.export import export_onnx
from fashionkp.inference.precision import calibration_photos, quantize_int8, type_input_nodes
from fashionkp.inference.predictor import KeypointPredictor, OnnxHeatmapRunner, TorchHeatmapRunner
from fashionkp.models import CPN, build_backbone
from fashionkp.training.train import train


def test_the_type_input_starts_as_no_input_and_changes_the_heatmaps_not_the_type_head():
    torch.manual_seed(0)
    told = CPN(build_backbone("tf_efficientnet_lite0"), 24, width=16, num_types=5, num_input_types=5)
    plain = CPN(build_backbone("tf_efficientnet_lite0"), 24, width=16, num_types=5)
    plain.load_state_dict({k: v for k, v in told.state_dict().items() if not k.startswith("type_input.")})
    told.eval()
    plain.eval()
    x = torch.rand(2, 3, 64, 64) * 255
    blouse_skirt = torch.tensor([0, 3])
    with torch.no_grad():
        # zero scales and shifts at the start: the network of a model trained without the input
        assert torch.equal(told(x, blouse_skirt).refine_heatmaps, plain(x).refine_heatmaps)
        torch.nn.init.normal_(told.type_input.table.weight, std=0.5)
        as_blouse_skirt, as_dress = told(x, blouse_skirt), told(x, torch.tensor([2, 2]))
    assert not torch.allclose(as_blouse_skirt.refine_heatmaps[1], as_dress.refine_heatmaps[1])
    with torch.no_grad():  # each photo its own type
        alone = told(x[:1], blouse_skirt[:1]).refine_heatmaps[0]
    torch.testing.assert_close(as_blouse_skirt.refine_heatmaps[0], alone, atol=1e-5, rtol=1e-4)
    assert torch.equal(as_blouse_skirt.type_logits, as_dress.type_logits)  # the type head reads the backbone only
    with pytest.raises(ValueError, match="takes each photo's garment type"):
        told(x)


@pytest.fixture(scope="module")
def told_types(synth_data, tmp_path_factory) -> dict:
    """A clothes=all model trained told the types, two passes (its validation equals evaluate.py's: test_one_path)."""
    run = tmp_path_factory.mktemp("told_types")
    cfg = compose_train([*TINY, "clothes=all", f"data.root={synth_data['train']}", "trainer.max_epochs=2",
                         "model.garment_type_input=true", "model.two_pass=true", "augmentation.crop=0.5",
                         "validate_best=true", "data.val_fraction=0.3"], run)  # fmt: skip
    return {"run": run, "result": train(cfg)}


def test_a_model_told_the_types_exports_them_as_an_onnx_input_in_fp32_and_int8(told_types, synth_data, tmp_path):
    checkpoint = told_types["result"]["best_checkpoint"]
    torch_runner = TorchHeatmapRunner.from_checkpoint(checkpoint, torch.device("cpu"))
    path = export_onnx(checkpoint, tmp_path / "told.onnx")
    onnx_runner = OnnxHeatmapRunner(path)
    assert onnx_runner.takes_types and torch_runner.takes_types
    images = (np.random.default_rng(0).random((2, 3, 64, 64)) * 255).astype(np.float32)
    for types in (np.array([0, 3]), np.array([4, 1])):
        expected, expected_types = torch_runner(images, types)
        heatmaps, told = onnx_runner(images, types)
        np.testing.assert_allclose(heatmaps.numpy(), expected.numpy(), atol=1e-4)
        np.testing.assert_allclose(told.numpy(), expected_types.numpy(), atol=1e-5)
    assert not np.allclose(onnx_runner(images, np.array([0, 0]))[0], onnx_runner(images, np.array([4, 4]))[0])
    # int8: calibrated with each photo's type, from its folder; the table of scales and shifts stays fp32 (quantized
    # as one tensor, one type's small values would round to another's)
    exported = onnx.load(str(path)).graph
    assert "Gather" in {n.op_type for n in exported.node if n.name in type_input_nodes(exported)}
    int8_path = quantize_int8(path, tmp_path / "int8.onnx", calibration_photos([synth_data["train"]], 6))
    graph = onnx.load(str(int8_path)).graph
    lookup = [n for n in graph.node if n.op_type == "Gather" and "types" in n.input]
    fp32_tables = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert len(lookup) == 1 and lookup[0].input[0] in fp32_tables
    quantized = OnnxHeatmapRunner(int8_path)(images, np.array([0, 3]))[0].numpy()
    assert quantized.shape == expected.shape and np.isfinite(quantized).all()


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_photos_of_unknown_type_are_told_the_type_the_head_tells(told_types, synth_data, backend):
    """The type-telling pass runs the network with any type; its heatmaps are not kept: the points are those of the
    network told the type its head tells, as if that type had been given."""
    predictor = KeypointPredictor(told_types["result"]["best_checkpoint"], device="cpu", backend=backend,
                                  precision="fp32")  # fmt: skip
    folders = sorted(Path(synth_data["train"], "Images").iterdir())
    photos = [load_image(p) for folder in folders for p in sorted(folder.glob("*.jpg"))[:2]]
    unknown = predictor.predict_photos(photos, [None] * len(photos))
    # told other than blouse, the placeholder of the type-telling pass: the points come from a pass told it
    assert set(unknown.categories) - {"blouse"}
    given = predictor.predict_photos(photos, unknown.categories)
    np.testing.assert_array_equal(unknown.points, given.points)
    # and the type it is told matters: neckline_left, a point of both, moves from blouse to outwear
    as_blouse = predictor.predict_photos(photos, ["blouse"] * len(photos)).points[:, 0, :2]
    as_outwear = predictor.predict_photos(photos, ["outwear"] * len(photos)).points[:, 0, :2]
    assert not np.allclose(as_blouse, as_outwear)


def test_a_run_resumes_only_as_it_was_trained(told_types, synth_data, tmp_path):
    last = told_types["result"]["last_checkpoint"]
    overrides = [*TINY, "clothes=all", f"data.root={synth_data['train']}", "trainer.max_epochs=3",
                 "model.two_pass=true", "data.val_fraction=0.3", f"ckpt_path={last}"]  # fmt: skip
    told = "trained with the garment-type input: resume it with model.garment_type_input=true"
    with pytest.raises(CheckpointError, match=told):
        train(compose_train(overrides, tmp_path))
