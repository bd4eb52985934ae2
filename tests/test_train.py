import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, compose_train
from hydra.utils import instantiate
from omegaconf import open_dict

from fashionkp.training.train import build_datamodule, train

CLOTHES = ["blouse", "dress", "outwear", "skirt", "trousers", "all"]


@pytest.mark.parametrize(
    "override",
    [f"backbone={b}" for b in ("resnet50", "resnet101", "resnet152", "senet154", "efficientnet_lite0")]
    + [f"augmentation={a}" for a in ("default", "seed", "none")]
    + [f"logger={name}" for name in ("wandb", "csv", "none")]
    + [f"trainer={t}" for t in ("default", "cpu", "gpu", "ddp", "ddp_spawn")]
    + ["resolution=512", "experiment=demo", "experiment=fashionai_cpu", "debug=fdr", "debug=overfit"],
)
def test_every_config_composes_and_instantiates(override, tmp_path, synth_data):
    cfg = compose_train([override, "backbone.pretrained=false", f"data.root={synth_data['train']}"], tmp_path)
    assert cfg.model.input_size == cfg.resolution and cfg.model.decode_sigma == cfg.heatmap.sigma / 2
    if override == "resolution=512":
        assert cfg.heatmap.sigma == 4.0  # derived from the resolution unless an experiment sets it
    trainer_cfg = {
        k: v
        for k, v in cfg.trainer.items()
        if k not in ("accelerator", "strategy", "precision", "devices", "sync_batchnorm")
    }
    trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == (1 if cfg.trainer.get("fast_dev_run") else cfg.trainer.max_epochs)
    if override.startswith("backbone="):
        module = instantiate(cfg.model, _recursive_=False)
        assert module.model.refine_net.predictor.out_channels == 13
    dm = build_datamodule(cfg)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == {"all": 50}.get(cfg.clothes.name, 10)


@pytest.mark.parametrize(
    "clothes", [c if c in ("skirt", "all") else pytest.param(c, marks=pytest.mark.slow) for c in CLOTHES]
)
def test_fast_dev_run_for_every_garment_type(clothes, tmp_path, synth_data):
    cfg = compose_train([*TINY, "debug=fdr", f"clothes={clothes}", f"data.root={synth_data['train']}"], tmp_path)
    result = train(cfg)
    assert result["global_step"] == 1
    assert math.isfinite(result["val_ne"]) and result["val_ne"] > 0  # a finite official NE (percent)


@pytest.mark.parametrize("experiment", ["demo", "fashionai_cpu"])
def test_every_experiment_runs_a_fast_dev_run(experiment, tmp_path, synth_data):
    cfg = compose_train([f"experiment={experiment}", "debug=fdr", f"data.root={synth_data['train']}"], tmp_path)
    assert cfg.task_name == experiment  # the experiment's values win over train.yaml's
    assert train(cfg)["global_step"] == 1


def test_multirun_sweeps_the_five_garment_types(tmp_path, synth_data):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "clothes=blouse,dress,outwear,skirt,trousers", *TINY,
           "debug=fdr", f"data.root={synth_data['train']}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(sweep.glob("*/result.json"))
    assert len(results) == 5
    assert {p.parent.name.split("clothes=")[1].split(",")[0] for p in results} == {
        "blouse",
        "dress",
        "outwear",
        "skirt",
        "trousers",
    }


def _state(ckpt_path: Path) -> dict:
    return torch.load(ckpt_path, map_location="cpu", weights_only=False)


def test_resume_after_a_crash_is_exact(tmp_path, synth_data):
    common = [*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=3",
              "data.batch_size=2", "model.scheduler.warmup_steps=2"]  # fmt: skip
    full = train(compose_train(common, tmp_path / "full"))
    crashed_dir = tmp_path / "crashed"
    crash = compose_train(
        [*common, "+callbacks.crash._target_=conftest.CrashAtEpoch", "+callbacks.crash.epoch=2"], crashed_dir
    )
    with pytest.raises(SystemExit, match="simulated crash"):
        train(crash)
    last = crashed_dir / "checkpoints" / "last.ckpt"
    assert _state(last)["epoch"] == 1
    assert not list((crashed_dir / "checkpoints").glob(".*.tmp"))  # atomic writes leave no partial files
    resumed = train(compose_train([*common, f"ckpt_path={last}"], tmp_path / "resumed"))
    a, b = _state(Path(full["last_checkpoint"])), _state(Path(resumed["last_checkpoint"]))
    assert a["global_step"] == b["global_step"] == resumed["global_step"] == 12
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"][0]["lr"] == pytest.approx(opt_b["param_groups"][0]["lr"])
    for k, s in opt_a["state"].items():
        assert torch.allclose(s["exp_avg"], opt_b["state"][k]["exp_avg"], atol=1e-6)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 12
    assert resumed["val_ne"] == pytest.approx(full["val_ne"], rel=1e-5)


def test_wandb_logs_offline_grouped_and_tagged_with_hydra_choices(tmp_path, synth_data, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    from fashionkp.training.train import build_loggers

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must come from the config, not the environment
    overrides = [o for o in TINY if not o.startswith("logger=")]
    overrides += ["logger=wandb", "clothes=skirt", f"data.root={synth_data['train']}", "+trainer.max_steps=2",
                  "+trainer.limit_val_batches=1", "group=ablation-x"]  # fmt: skip
    cfg = compose_train(overrides, tmp_path, hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as under @hydra.main, which hands the job its config without `hydra`
    with open_dict(cfg):
        del cfg["hydra"]
    wandb_logger = next(lg for lg in build_loggers(cfg) if type(lg).__name__ == "WandbLogger")
    run = wandb_logger.experiment
    assert run.settings.mode in ("offline", "dryrun") and run.group == "ablation-x"  # wandb calls offline "dryrun"
    assert {"clothes=skirt", "backbone=efficientnet_lite0", "logger=wandb"} <= set(run.tags)
    run.finish()
    train(cfg)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    assert (tmp_path / "csv" / "metrics.csv").is_file()
