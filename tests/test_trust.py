"""Sweeps, wandb, DDP, mid-epoch resume, bf16 decoding, diverging runs, runs without validation: each
test here failed on the code before its fix."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_train, run_cli

from fashionkp.training.train import train


def test_a_sequential_wandb_sweep_gives_each_job_its_own_run(tmp_path, synth_data):
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith("logger=")]
    done = run_cli("train.py", ["-m", "clothes=skirt,dress", *overrides, "logger=wandb", "debug=fdr",
                                "~logger.csv", f"data.root={synth_data['train']}", f"hydra.sweep.dir={sweep}"],
                   cwd=tmp_path, env={"WANDB_MODE": "offline"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2
    ids = []
    for job, (own, other) in zip(jobs, (("skirt", "dress"), ("dress", "skirt")), strict=True):
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{job.name}: {runs}"  # job 2 used to log into job 1's run
        ids.append(runs[0].name.rsplit("-", 1)[1])
        # An offline run keeps its tags and config in its .wandb record file: this job's, not the other's.
        record = next(runs[0].glob("run-*.wandb")).read_bytes()
        # (the command line, "clothes=skirt,dress", is in both: only JSON config values are quoted)
        assert f"clothes={own}".encode() in record and f'"{own}"'.encode() in record
        assert f'"{other}"'.encode() not in record
        assert b"train-sweep" in record  # the sweep's group
    assert ids[0] != ids[1]


def test_ddp_breakdown_equals_a_single_process(tmp_path, synth_data):
    """Every number of val_ne_best.json under 2-process gloo DDP equals one process's on the same images."""
    import pytorch_lightning as pl

    from fashionkp.training.train import build

    common = [*TINY, "clothes=all", f"data.root={synth_data['train']}", "data.val_fraction=0.35"]
    run = tmp_path / "ddp"
    done = run_cli("train.py", [*common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                                "trainer.precision=32-true", "trainer.sync_batchnorm=false", "trainer.max_epochs=1",
                                "validate_best=true", f"hydra.run.dir={run}"], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads((run / "val_ne_best.json").read_text())
    cfg = compose_train(common, tmp_path / "single")
    module, datamodule = build(cfg)
    datamodule.setup()
    assert len(datamodule.val_set) % 2 == 1  # uneven shards: every image still scored exactly once
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=datamodule, ckpt_path=ddp["checkpoint"], verbose=False
    )
    single = module.last_val_result.as_dict()
    assert ddp["counted"] == single["counted"] and ddp["counted_per_category"] == single["counted_per_category"]
    assert ddp["skipped"] == single["skipped"]
    # Equal to 1e-6 relative: each DDP process runs the float32 forward on other batches with its own thread
    # count, which moves heatmaps in the last bits (a shard's breakdown alone is off by whole percent).
    assert ddp["ne"] == pytest.approx(single["ne"], rel=1e-6)
    assert ddp["per_category"] == pytest.approx(single["per_category"], rel=1e-6)
    assert ddp["per_keypoint"] == pytest.approx(single["per_keypoint"], rel=1e-6)
    assert set(ddp["per_category"]) == {"blouse", "outwear", "dress", "skirt", "trousers"}


def test_synchronized_batch_norms_keep_timm_activations_and_come_back_trained():
    """trainer.sync_batchnorm: every batch norm of the CPN becomes a SyncBatchNorm and the network computes
    what it did (Lightning's own conversion drops the activation timm fuses into its batch norms); after the
    fit the original layers come back, with the weights and statistics trained in between."""
    import copy

    from pytorch_lightning.plugins import TorchSyncBatchNorm
    from torch import nn

    from fashionkp.models import CPN, build_backbone
    from fashionkp.training.callbacks import TimmSyncBatchNorm

    def norms(model: nn.Module) -> dict[str, type]:
        return {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    torch.manual_seed(0)
    model = CPN(build_backbone("tf_efficientnet_lite0"), num_keypoints=5, width=16).eval()
    images = torch.rand(2, 3, 64, 64) * 255
    reference = model(images).refine_heatmaps
    original, loaded = norms(model), {k: v.clone() for k, v in model.state_dict().items()}
    assert any("BatchNormAct" in t.__name__ for t in original.values())
    stock = TorchSyncBatchNorm().apply(copy.deepcopy(model))
    assert not torch.allclose(stock(images).refine_heatmaps, reference)  # the backbone's activations are gone

    plugin = TimmSyncBatchNorm()
    synced = plugin.apply(model)
    assert set(original) == {n for n, t in norms(synced).items() if issubclass(t, nn.SyncBatchNorm)}
    assert torch.equal(synced(images).refine_heatmaps, reference)
    synced.double().float()  # new buffers, as moving the model to its GPU gives them
    optimizer = torch.optim.SGD(synced.parameters(), lr=0.1)
    synced.train()(images).refine_heatmaps.square().mean().backward()
    optimizer.step()
    trained = {k: v.clone() for k, v in synced.state_dict().items()}
    assert not all(torch.equal(trained[k], v) for k, v in loaded.items() if k.endswith("running_mean"))
    expected = synced.eval()(images).refine_heatmaps

    reverted = plugin.revert(synced)
    assert norms(reverted) == original
    assert all(torch.equal(v, trained[k]) for k, v in reverted.state_dict().items())
    assert torch.equal(reverted(images).refine_heatmaps, expected)


def test_ddp_runs_synchronize_batch_norms_the_way_timm_does_and_only_on_gpus(tmp_path, monkeypatch):
    """trainer=ddp turns sync_batchnorm on: the trainer's layer sync is timm's conversion, not Lightning's. DDP on
    CPU processes, where torch refuses synchronized batch norms once the fit starts, is refused before it."""
    from omegaconf import OmegaConf

    from fashionkp.checks import check_sync_batchnorm
    from fashionkp.errors import ConfigError
    from fashionkp.training.callbacks import TimmSyncBatchNorm
    from fashionkp.training.train import build_trainer

    cfg = compose_train([*TINY, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1"], tmp_path)
    assert cfg.trainer.sync_batchnorm
    assert isinstance(build_trainer(cfg, [], []).strategy._layer_sync, TimmSyncBatchNorm)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused = "trainer.sync_batchnorm=True: synchronized batch norms need GPUs"
    for trainer in [{"strategy": "ddp", "accelerator": "cpu"}, {"strategy": "ddp_spawn", "accelerator": "auto"},
                    {"strategy": "auto", "accelerator": "cpu", "devices": 2}]:  # fmt: skip
        with pytest.raises(ConfigError, match=refused):
            check_sync_batchnorm(OmegaConf.create({"sync_batchnorm": True, **trainer}))
    for trainer in [{"strategy": "ddp", "accelerator": "gpu", "sync_batchnorm": True},
                    {"strategy": "auto", "accelerator": "cpu", "devices": 1, "sync_batchnorm": True},
                    {"strategy": "ddp", "accelerator": "cpu", "sync_batchnorm": False}]:  # fmt: skip
        check_sync_batchnorm(OmegaConf.create(trainer))


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, synth_data):
    # 36 training images, batch 4: 9 steps an epoch; a rolling step checkpoint every 3 steps; one data
    # worker, so that batches are fetched ahead of the training loop as in real runs.
    common = [*TINY, "clothes=all", f"data.root={synth_data['train']}", "trainer.max_epochs=2",
              "data.num_workers=1", "callbacks.step_checkpoint.every_n_train_steps=3",
              "model.scheduler.warmup_steps=4"]  # fmt: skip
    full = train(compose_train(common, tmp_path / "full"))
    assert full["global_step"] == 18
    killed = tmp_path / "killed"
    done = run_cli("train.py", [*common, "+callbacks.kill._target_=conftest.KillAtStep", "+callbacks.kill.step=13",
                                f"hydra.run.dir={killed}"], cwd=tmp_path)  # fmt: skip
    assert done.returncode == -9
    step_ckpt = _checkpoint(killed / "checkpoints" / "step.ckpt")
    assert step_ckpt["global_step"] == 12  # mid-epoch: 3 of the second epoch's 9 steps done
    assert not list((killed / "checkpoints").glob(".*.tmp"))
    resumed = train(compose_train([*common, f"ckpt_path={killed}"], tmp_path / "resumed"))
    a, b = _checkpoint(Path(full["last_checkpoint"])), _checkpoint(Path(resumed["last_checkpoint"]))
    assert a["global_step"] == b["global_step"] == 18
    for key, value in a["state_dict"].items():  # bitwise: same data, same order, same arithmetic on CPU
        assert torch.equal(value, b["state_dict"][key]), key
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"][0]["lr"] == opt_b["param_groups"][0]["lr"]
    for k, state in opt_a["state"].items():
        assert torch.equal(state["exp_avg"], opt_b["state"][k]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], opt_b["state"][k]["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_decoding_stays_fp32_under_bf16_autocast():
    from fashionkp.data.codec import HeatmapCodec

    codec = HeatmapCodec(stride=4, sigma=2.0, global_sigma=2.0, decoder="dark", decode_sigma=1.0, include_occluded=True)
    rng = np.random.default_rng(0)
    heatmaps = torch.from_numpy(rng.random((3, 4, 16, 16)).astype(np.float32))
    reference, _ = codec.decode(heatmaps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16, _ = codec.decode(heatmaps)
        assert not torch.equal(heatmaps.bfloat16().float(), heatmaps)  # bf16 would have moved the inputs
    assert torch.equal(under_bf16, reference)


@pytest.mark.parametrize("cpu_has_bf16", [True, False])
def test_a_bf16_mixed_cpu_run_trains_and_validates(synth_data, tmp_path, monkeypatch, caplog, cpu_has_bf16):
    """On a CPU with AVX-512 BF16 the run trains in bf16; without it, in 32-true, and its log says so."""
    from fashionkp.inference import precision

    flags = {"avx512f", "avx512_bf16"} if cpu_has_bf16 else {"avx2"}
    monkeypatch.setattr(precision, "cpu_features", lambda: precision.CpuFeatures(frozenset(flags)))
    cfg = compose_train([*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.precision=bf16-mixed",
                         "trainer.max_epochs=1"], tmp_path)  # fmt: skip
    with caplog.at_level(logging.INFO):
        result = train(cfg)
    assert result["global_step"] == 2 and np.isfinite(result["val_ne"])
    fell_back = "trainer.precision=bf16-mixed: this CPU (AVX2, bf16 no, VNNI no) has no AVX-512 BF16" in caplog.text
    assert fell_back != cpu_has_bf16
    assert ("Using bfloat16 Automatic Mixed Precision" in caplog.text) == cpu_has_bf16  # Lightning's own line


def test_a_diverging_run_stops_at_once_and_keeps_its_last_good_checkpoint(synth_data, tmp_path):
    from fashionkp.training.module import NonFiniteLossError

    common = [*TINY, "clothes=all", f"data.root={synth_data['train']}", "trainer.max_epochs=3",
              "callbacks.step_checkpoint.every_n_train_steps=2", "+callbacks.poison._target_=conftest.PoisonAtStep",
              "+callbacks.poison.step=5"]  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 5 \(epoch 0\)"):
        train(compose_train(common, tmp_path))
    kept = _checkpoint(tmp_path / "checkpoints" / "step.ckpt")
    assert kept["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_a_run_stopped_before_its_last_epoch_ends_still_reports_its_ne(synth_data, tmp_path):
    # stopped by max_steps in the first of two epochs, which no validation interval reaches
    cfg = compose_train([*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=2",
                         "trainer.check_val_every_n_epoch=5", "+trainer.max_steps=2"], tmp_path)  # fmt: skip
    result = train(cfg)
    assert np.isfinite(result["val_ne"])
    assert np.isfinite(json.loads((tmp_path / "result.json").read_text())["val_ne"])
    assert len((tmp_path / "val_ne.csv").read_text().splitlines()) == 2  # header + the final validation


def test_the_last_epoch_is_validated_whatever_the_validation_interval(synth_data, tmp_path):
    """3 epochs validated every 2nd: the third is validated too, so the run reports (and may keep as its best)
    the weights it ends with, not the second epoch's."""
    cfg = compose_train([*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=3",
                         "trainer.check_val_every_n_epoch=2"], tmp_path)  # fmt: skip
    result = train(cfg)
    rows = [r.split(",") for r in (tmp_path / "val_ne.csv").read_text().splitlines()]
    assert [r[0] for r in rows] == ["epoch", "1", "2"]
    assert result["val_ne"] == pytest.approx(float(rows[-1][2]))


def test_a_run_resumed_inside_its_last_epoch_validates_it(synth_data, tmp_path):
    """Lightning does not start a resumed epoch again (no on_train_epoch_start): the last epoch is validated and
    kept as the best checkpoint all the same."""
    # 36 training images, batch 4: 9 steps an epoch; stopped at step 12, 3 steps into the second and last epoch
    common = [*TINY, "clothes=all", f"data.root={synth_data['train']}", "trainer.max_epochs=2",
              "trainer.check_val_every_n_epoch=5", "callbacks.step_checkpoint.every_n_train_steps=3"]  # fmt: skip
    train(compose_train([*common, "+trainer.max_steps=12"], tmp_path / "stopped"))
    step = tmp_path / "stopped" / "checkpoints" / "step.ckpt"
    assert torch.load(step, weights_only=False)["global_step"] == 12
    resumed = train(compose_train([*common, f"ckpt_path={step}"], tmp_path / "resumed"))
    assert resumed["global_step"] == 18
    assert Path(resumed["best_checkpoint"]).name.startswith("epoch001-")
    rows = (tmp_path / "resumed" / "val_ne.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1"]


def test_the_best_checkpoint_validation_adds_no_row_to_the_epoch_table(synth_data, tmp_path, monkeypatch):
    # validated again as when the best checkpoint is not the weights validated last
    monkeypatch.setattr("fashionkp.training.train.saved_at_last_validation", lambda checkpoint, module: False)
    cfg = compose_train([*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=2",
                         "validate_best=true"], tmp_path)  # fmt: skip
    result = train(cfg)
    rows = (tmp_path / "val_ne.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "0", "1"]
    best = json.loads((tmp_path / "val_ne_best.json").read_text())
    assert best["unit"] == "%" and best["ne"] == pytest.approx(result["best_val_ne"])


def test_the_best_checkpoint_is_validated_again_only_when_other_weights_were_validated_last(
    synth_data, tmp_path, monkeypatch
):
    """A fit whose last validation saved the best checkpoint reports that validation (it scored the same weights)
    rather than repeat it (about 130 s of the CPU recipe's 45 minutes); a checkpoint from another step, or one that
    cannot be read as a local file, is validated."""
    import pytorch_lightning as pl

    from fashionkp.training.train import saved_at_last_validation

    validations = []
    validate = pl.Trainer.validate
    monkeypatch.setattr(pl.Trainer, "validate", lambda *a, **k: validations.append(k) or validate(*a, **k))
    cfg = compose_train([*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=1",
                         "validate_best=true"], tmp_path)  # fmt: skip
    result = train(cfg)
    assert validations == []  # the one validation was the fit's own
    best, last = (json.loads((tmp_path / f"val_ne_{n}.json").read_text()) for n in ("best", "last"))
    assert best["checkpoint"] == result["best_checkpoint"] and best["ne"] == last["ne"] == result["best_val_ne"]
    assert best["per_keypoint"] == last["per_keypoint"]
    step = torch.load(result["best_checkpoint"], weights_only=False)["global_step"]
    assert step > 0 and saved_at_last_validation(result["best_checkpoint"], type("Fit", (), {"last_val_step": step}))
    assert not saved_at_last_validation(result["best_checkpoint"], type("Fit", (), {"last_val_step": step + 1}))
    assert not saved_at_last_validation(result["best_checkpoint"], object())  # no validation during the fit
    assert not saved_at_last_validation(str(tmp_path / "elsewhere.ckpt"), type("Fit", (), {"last_val_step": step}))


def test_a_diverging_job_does_not_end_its_sweep(synth_data, tmp_path):
    sweep = tmp_path / "sweep"
    poison = ["+callbacks.poison.step=1,1000", "+callbacks.poison._target_=conftest.PoisonAtStep"]
    args = ["-m", *poison, *TINY, "clothes=skirt", "trainer.max_epochs=1", f"data.root={synth_data['train']}"]
    done = run_cli("train.py", [*args, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "training loss is nan at step 1" in done.stdout + done.stderr
    results = sorted(sweep.glob("*/result.json"))
    assert len(results) == 1 and "step=1000" in results[0].parent.name  # the healthy job ran after the diverged one
