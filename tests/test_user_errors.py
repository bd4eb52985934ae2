"""Known user errors: one line naming the key, file, row or value, exit status 2, no traceback."""

import sys
import time

import pytest
from conftest import TINY, run_cli


def _entry(module: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Run an entry point in this process as its console script would, for speed: (exit status, stderr)."""
    import importlib

    main = getattr(importlib.import_module("fashionkp.commands"), f"{module}_main")
    # Hydra's log handlers would outlive pytest's captured streams: keep them off in-process.
    monkeypatch.setattr(sys, "argv", [module, *args, "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_a_typo_in_the_decoder_is_refused_in_seconds(tmp_path, synth_data):
    start = time.monotonic()
    done = run_cli("train.py", ["heatmap.decoder=drak", f"data.root={synth_data['train']}"], cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fashionkp-train: error: heatmap.decoder='drak': not a valid choice (choices: dark, quarter_offset, argmax)"
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert elapsed < 30  # no data read, no model built: only Python's imports


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("resolution=500", "resolution=500: the input side must be a positive multiple of 32"),
        ("data.root=/no/such/split", "data.root='/no/such/split': no such folder or CSV file"),
        ("backbone.name=resnet5", "backbone.name='resnet5': not a timm model"),
        ("backbone.name=vit_tiny_patch16_224", "backbone.name='vit_tiny_patch16_224': no feature maps at strides"),
        ("trainer.precision=bf15", "trainer.precision='bf15': not a valid choice"),
        ("logger.wandb.offline=false", "logger.wandb.offline=False: online wandb needs an account on this machine"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path='/no/such.ckpt': no such checkpoint file or run folder"),
        ("augmentation.crop=1.5", "augmentation.crop=1.5: the share of crop samples lies in [0, 1]"),
        ("augmentation.crop=half", "augmentation.crop='half': the share of crop samples lies in [0, 1]"),
        (
            "augmentation.crop_margin=[0.1,0.2,0.3]",
            "augmentation.crop_margin=[0.1, 0.2, 0.3]: a range [low, high] with 0 <= low <= high",
        ),
        ("augmentation.crop_jitter=wide", "augmentation.crop_jitter='wide': a number, not negative"),
        (
            "model.two_pass=true model.crop_margin=wide",
            "model.crop_margin='wide': the crop margin is a fraction of the box's side, in [0, 2]",
        ),
        ("augmentation.erase=1.5", "augmentation.erase=1.5: the share of erased samples lies in [0, 1]"),
        ("augmentation.erase_area=0.1", "augmentation.erase_area=0.1: a range [low, high] with 0 < low <= high <= 1"),
        (
            "augmentation.erase_area=[0,0.2]",
            "augmentation.erase_area=[0, 0.2]: a range [low, high] with 0 < low <= high <= 1",
        ),
        (
            "augmentation.crop_margin=[0.3,0.1]",
            "augmentation.crop_margin=[0.3, 0.1]: a range [low, high] with 0 <= low <= high",
        ),
        (
            "model.two_pass=true model.crop_margin=5",
            "model.crop_margin=5: the crop margin is a fraction of the box's side, in [0, 2]",
        ),
        (
            "model.two_pass=true model.crop_passes=0",
            "model.crop_passes=0: the number of crop passes after the first, a whole number from 1",
        ),
        ("model.test_scales=[0]", "model.test_scales=[0]: must be a list of positive factors"),
        ("model.frozen_backbone_stages=5", "model.frozen_backbone_stages=5: must be 0 to 4"),
        ("model.backbone_lr_factor=0", "model.backbone_lr_factor=0: must be positive"),
        ("model.backbone_lr_factor=fast", "model.backbone_lr_factor='fast': must be positive"),
        ("model.ema_decay=1", "model.ema_decay=1: must be between 0 and 1 (or null: no average)"),
        (
            "clothes=skirt model.garment_type_input=true",
            "model.garment_type_input=True: a clothes=skirt model serves one garment type: there is no type to tell it",
        ),
        (
            "trainer=ddp trainer.accelerator=cpu",
            "trainer.sync_batchnorm=True: synchronized batch norms need GPUs"
            " (set trainer.sync_batchnorm=false for DDP on CPU)",
        ),
        (
            "resolution=256 model.test_scales=[1.25]",
            "model.test_scales=[1.25]: none runs the model at its input size 256",
        ),
        (
            "model.test_scales=[0.9,1.0] data.keep_val_photos=false",
            "data.keep_val_photos=False: a crop pass or other test scales validate on the photos themselves",
        ),
    ],
)
def test_training_config_mistakes_get_one_line(override, line, synth_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    args = [
        f"data.root={synth_data['train']}",
        "logger=wandb",
        *TINY[:2],
        *override.split(),
        f"hydra.run.dir={tmp_path}",
    ]
    code, err = _entry("train", args, monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fashionkp-train: error: {line}"), err


def test_no_data_root_says_which_key_to_set(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FASHIONAI_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    code, err = _entry("train", [f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capsys)
    assert code == 2
    assert err.strip() == (
        "fashionkp-train: error: data.root='data/fashionai/train': no such folder or CSV file (give a FashionAI "
        "split folder holding Images/ and Annotations/: data.root=/path/to/split, a list data.root=[/a,/b], "
        "or set FASHIONAI_DIR)"
    )


def test_pretrained_weights_that_cannot_be_had_are_refused_at_once(synth_data, tmp_path, monkeypatch, capsys):
    from fashionkp import checks

    monkeypatch.setattr(checks, "_reachable", lambda host: False)  # as on a machine without the hub
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr("timm.models._hub.check_cached_file", lambda *a, **k: False)
    args = [f"data.root={synth_data['train']}", "backbone=resnet50", f"hydra.run.dir={tmp_path}"]
    code, err = _entry("train", args, monkeypatch, capsys)
    assert code == 2
    assert "backbone.pretrained=True: ImageNet weights for 'resnet50.tv_in1k' cannot be had" in err
    assert "backbone.weights=/path/to/weights.pth" in err and len(err.strip().splitlines()) == 1


def _predict_args(tiny_checkpoints, synth_data, tmp_path, *extra) -> list[str]:
    return [f"checkpoints=[{tiny_checkpoints['a']}]", f"test_csv={synth_data['test_csv']}", "num_workers=0", "draw=0",
            f"hydra.run.dir={tmp_path / 'out'}", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["decoder=drak"], "decoder='drak': not a valid choice (choices: dark, quarter_offset, argmax)"),
        (["weights=[1,2]"], "weights=[1, 2]: 2 ensemble weights for 1 checkpoints"),
        (["checkpoints=/no/such.ckpt"], "checkpoints='/no/such.ckpt': no such checkpoint file"),
        (["scales=[0]"], "scales=[0]: must be a list of positive factors (e.g. [1.0] or [1.0,1.25])"),
        (["crop_scales=[-1]"], "crop_scales=[-1]: must be a list of positive factors (e.g. [1.0] or [1.0,1.25])"),
        (["fine_checkpoints=/no/fine.ckpt"], "fine_checkpoints='/no/fine.ckpt': no such checkpoint file"),
        (
            ["two_pass=true", "fine_checkpoints=${checkpoints}", "fine_weights=[1,2]"],
            "fine_weights=[1, 2]: 2 ensemble weights for 1 checkpoints",
        ),
        (
            ["two_pass=false", "fine_checkpoints=${checkpoints}"],
            "fine_checkpoints=['last.ckpt']: dedicated crop-pass models need the crop pass (two_pass=true)",
        ),
        (
            ["two_pass=true", "crop_margin=-1"],
            "crop_margin=-1: the crop margin is a fraction of the box's side, in [0, 2]",
        ),
        (["crop_passes=two"], "crop_passes='two': the number of crop passes after the first, a whole number from 1"),
    ],
)
def test_prediction_mistakes_get_one_line(extra, line, tiny_checkpoints, synth_data, tmp_path, monkeypatch, capsys):
    code, err = _entry("predict", _predict_args(tiny_checkpoints, synth_data, tmp_path, *extra),
                       monkeypatch, capsys)  # fmt: skip
    assert code == 2 and err.strip() == f"fashionkp-predict: error: {line}"


def test_a_file_that_is_not_a_checkpoint(tiny_checkpoints, synth_data, tmp_path, monkeypatch, capsys):
    fake = tmp_path / "notes.ckpt"
    fake.write_text("not a checkpoint")
    args = [f"checkpoints={fake}", f"data.root={synth_data['train']}", f"hydra.run.dir={tmp_path}", "backend=torch"]
    code, err = _entry("evaluate", args, monkeypatch, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"fashionkp-evaluate: error: {fake}: cannot read checkpoint (truncated or not a checkpoint)")


def test_a_test_csv_with_an_unknown_category(tiny_checkpoints, synth_data, tmp_path, monkeypatch, capsys):
    csv = tmp_path / "test.csv"
    csv.write_text("image_id,image_category\nImages/skirt/a.jpg,skirt\nImages/hat/b.jpg,hat\n")
    code, err = _entry("predict", [f"checkpoints={tiny_checkpoints['a']}", f"test_csv={csv}",
                                             f"hydra.run.dir={tmp_path}"], monkeypatch, capsys)  # fmt: skip
    assert code == 2
    assert err.strip() == (
        f"fashionkp-predict: error: {csv}:3, column image_category: unknown category 'hat' "
        "(expected one of blouse, outwear, dress, skirt, trousers)"
    )


def test_a_garment_type_the_model_was_not_trained_for(skirt_checkpoint, synth_data, tmp_path, monkeypatch, capsys):
    photos = next((synth_data["train"] / "Images" / "dress").glob("*.jpg")).parent
    code, err = _entry("predict", [f"checkpoints={skirt_checkpoint}", f"images={photos}", "clothes=dress",
                                             f"hydra.run.dir={tmp_path / 'out'}"], monkeypatch, capsys)  # fmt: skip
    assert code == 2
    assert err.strip() == (
        "fashionkp-predict: error: no model for garment type 'dress': the checkpoints were trained for ['skirt']"
    )


def test_online_wandb_is_allowed_once_logged_in(tmp_path, monkeypatch, synth_data):
    from conftest import compose_train

    from fashionkp.checks import check_loggers
    from fashionkp.errors import ConfigError

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_train(["logger=wandb", "logger.wandb.offline=false", f"data.root={synth_data['train']}"], tmp_path)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="wandb login"):
        check_loggers(cfg)
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # what `wandb login` writes
    check_loggers(cfg)
