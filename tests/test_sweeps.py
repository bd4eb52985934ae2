"""Sweeps beyond one machine: the SLURM launcher config (hydra-submitit-launcher) and the Optuna search
(hydra-optuna-sweeper). Both plugins are optional extras: the tests skip without them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, compose_train
from omegaconf import OmegaConf

CLOTHES = ["blouse", "dress", "outwear", "skirt", "trousers"]

# Runs train.py as a user would, minus the cluster: each array task of the submitted job reports itself done
# instead of submitit polling sacct for a result that no node will ever write.
_SUBMIT_ONLY = """
import runpy, sys
from hydra.core.utils import JobReturn, JobStatus
from submitit.slurm.slurm import SlurmJob

SlurmJob.results = lambda self: [JobReturn(status=JobStatus.COMPLETED, _return_value=0.0)]
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def _fake_slurm(bin_dir: Path) -> dict[str, str]:
    """An environment whose ``srun`` exists (submitit refuses to build a SLURM executor otherwise) and whose
    ``sbatch`` accepts a job as a real one does, so the submission file stays on disk for inspection."""
    bin_dir.mkdir()
    for name, body in {"srun": "exit 0", "sbatch": 'echo "Submitted batch job 4242"'}.items():
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            flags[key] = value
    return flags


def test_slurm_ddp_ties_tasks_and_gpus_to_the_trainer(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    cfg = compose_train(
        ["hydra/launcher=slurm_ddp", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
        tmp_path,
        hydra_config=True,
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # one task per GPU on every node, as Lightning's SLURMEnvironment expects
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    # built on the plugin's structured config, not a copy of it: every field the plugin knows, typed as it says
    assert set(launcher) == set(OmegaConf.structured(SlurmQueueConf))
    OmegaConf.merge(OmegaConf.structured(SlurmQueueConf), launcher)

    single = compose_train(["hydra/launcher=slurm_ddp"], tmp_path, hydra_config=True).hydra.launcher
    assert (single.nodes, single.tasks_per_node, single.gpus_per_node) == (1, 1, 1)


def test_slurm_ddp_sweep_submits_one_array_job_per_garment(tmp_path):
    """``python train.py -m hydra/launcher=slurm_ddp ... clothes=<five>`` through the real plugin and submitit,
    down to the sbatch file and the pickled jobs a cluster would run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from submitit.core.utils import DelayedSubmission

    sweep_dir = tmp_path / "sweep"
    overrides = ["hydra/launcher=slurm_ddp", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    proc = subprocess.run(
        [sys.executable, "-c", _SUBMIT_ONLY, "-m", *overrides, f"clothes={','.join(CLOTHES)}"]
        + [f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT,
        env=_fake_slurm(tmp_path / "bin"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    flags = _sbatch_flags((sweep_dir / ".submitit" / "4242" / "4242_submission.sh").read_text())
    assert flags["array"] == "0-4%5"  # five jobs, all at once
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("2", "4", "4")
    assert (flags["cpus-per-task"], flags["mem-per-gpu"], flags["time"]) == ("8", "32G", "1440")

    # the job each array task unpickles and runs: the launcher, called with that garment type's overrides
    for index, clothes in enumerate(CLOTHES):
        job = DelayedSubmission.load(sweep_dir / ".submitit" / f"4242_{index}" / f"4242_{index}_submitted.pkl")
        assert f"clothes={clothes}" in job.args[0]
        assert job.args[2] == index  # hydra.job.num


def test_optuna_search_runs_trials_and_reports_the_best(synth_data, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    space = OmegaConf.load(ROOT / "conf" / "hparams_search" / "optuna.yaml").hydra.sweeper.params
    assert set(space) == {"model.optimizer.lr", "heatmap.sigma", "model.loss.pos_weight"}

    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *TINY, "debug=fdr"]
        + [f"data.root={synth_data['train']}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = sorted(p for p in sweep_dir.iterdir() if (p / "result.json").is_file())
    assert [p.name for p in runs] == ["0", "1"]
    sampled = []
    for run in runs:
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml"))
        params = {key: float(overrides[key]) for key in space}
        # the sampled values reached the run's composed config
        assert OmegaConf.load(run / ".hydra" / "config.yaml").heatmap.sigma == params["heatmap.sigma"]
        ne = OmegaConf.load(run / "result.json").val_ne
        assert math.isfinite(ne), f"trial {run.name} returned NE {ne}"
        sampled.append((params, ne))

    result = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    best = OmegaConf.to_container(result.best_params)
    assert 1e-4 <= best["model.optimizer.lr"] <= 1e-2
    assert 1.0 <= best["heatmap.sigma"] <= 4.0
    assert 5.0 <= best["model.loss.pos_weight"] <= 40.0
    assert math.isfinite(result.best_value)
    # minimised: the best trial is the run with the lower NE
    best_params, best_ne = min(sampled, key=lambda trial: trial[1])
    assert best == pytest.approx(best_params)
    assert result.best_value == pytest.approx(best_ne)
