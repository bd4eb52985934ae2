from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
FASHIONAI_TRAIN = SHARED_DATA / "fashionai" / "train"
METRIC_CHECK = SHARED_DATA / "fashionai" / "metric_check"

needs_shared = pytest.mark.skipif(not FASHIONAI_TRAIN.is_dir(), reason="../shared/data (real FashionAI files) absent")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic FashionAI-format dataset (10 train + 2 test images per garment type)."""
    from fashionkp.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth"), n_per_category=10, n_test_per_category=2, seed=7, progress=False)


def compose_train(overrides: list[str], output_dir: Path, hydra_config: bool = False):
    """The training config as Hydra composes it from conf/, with a concrete output folder."""
    from hydra import compose, initialize_config_dir

    import fashionkp.training.train  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train", overrides=[*overrides, f"paths.output_dir={output_dir}"], return_hydra_config=hydra_config
        )


# A configuration that runs a real CPN step in about a second on 2 CPU cores.
TINY = [
    "backbone=efficientnet_lite0", "backbone.pretrained=false", "resolution=64", "model.width=16",
    "logger=none", "data.num_workers=0", "data.batch_size=4", "validate_best=false",
    "callbacks.progress_bar.refresh_rate=0",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_checkpoints(synth_data, tmp_path_factory) -> dict[str, Path]:
    """Two quickly trained clothes=all checkpoints (different seeds/widths) on the synthetic data."""
    from fashionkp.training.train import train

    out = {}
    for name, extra in {"a": ["seed=1"], "b": ["seed=2", "model.width=24", "resolution=96"]}.items():
        run = tmp_path_factory.mktemp(f"ckpt_{name}")
        cfg = compose_train(
            [*TINY, "clothes=all", f"data.root={synth_data['train']}", "trainer.max_epochs=2", *extra], run
        )
        out[name] = Path(train(cfg)["last_checkpoint"])
    return out


class CrashAtEpoch:
    """A callback that kills a run when an epoch starts, as a power cut would (for resume tests)."""

    def __new__(cls, epoch: int):
        import pytorch_lightning as pl

        class _Crash(pl.Callback):
            def on_train_epoch_start(self, trainer, module):
                if trainer.current_epoch == epoch:
                    raise SystemExit(f"simulated crash at epoch {epoch}")

        return _Crash()


class RecordWeights:
    """A callback that saves the module's state after every optimizer step to ``path`` (a list of state dicts)."""

    def __new__(cls, path: str):
        import pytorch_lightning as pl
        import torch

        class _Record(pl.Callback):
            def __init__(self):
                self.steps: list[dict] = []

            def on_train_batch_end(self, trainer, module, *args):
                self.steps.append({k: v.detach().clone() for k, v in module.state_dict().items()})

            def on_train_end(self, trainer, module):
                torch.save(self.steps, path)

        return _Record()


class KillAtStep:
    """A callback that kills its own process with SIGKILL after an optimizer step, as a power cut would:
    no exception handler, no atexit, no flush (for mid-epoch resume tests)."""

    def __new__(cls, step: int):
        import signal

        import pytorch_lightning as pl

        class _Kill(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if trainer.global_step == step:
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()


def run_cli(script: str, args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """Run one of the repository's entry scripts as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

    environment = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env=environment,
    )  # fmt: skip


class PoisonAtStep:
    """A callback that puts a NaN into the weights before a step, as a diverging run would."""

    def __new__(cls, step: int):
        import pytorch_lightning as pl
        import torch

        class _Poison(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if trainer.global_step == step:
                    with torch.no_grad():
                        next(module.parameters()).fill_(float("nan"))

        return _Poison()


@pytest.fixture(scope="session")
def skirt_checkpoint(synth_data, tmp_path_factory) -> Path:
    """A one-epoch clothes=skirt checkpoint (a per-type model)."""
    from fashionkp.training.train import train

    run = tmp_path_factory.mktemp("ckpt_skirt")
    cfg = compose_train([*TINY, "clothes=skirt", f"data.root={synth_data['train']}", "trainer.max_epochs=1"], run)
    return Path(train(cfg)["last_checkpoint"])


class ServeProcess:
    """``fashionkp serve ARGS`` in a subprocess on a free loopback port, in its own process group so that its model
    workers can be checked for and stopped with it; its log goes to a file (a pipe nobody reads would stall it)."""

    def __init__(self, args: list[str], log: Path, cwd: Path | None = None) -> None:
        import socket
        import subprocess
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "fashionkp.cli", "serve", *args, "--port", str(self.port)]
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_ready(self, timeout: float = 180.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"fashionkp serve exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                    if answer.read() == b"ok":
                        return
            except OSError:  # not listening yet, or 503 while the workers load
                pass
            time.sleep(0.5)
        raise AssertionError(f"fashionkp serve not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def group(self) -> list[int]:
        """The live processes of the server's process group (its model workers included)."""
        import contextlib

        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError):
                # pid (name) state ppid pgrp ...: the name may hold spaces, what follows it does not
                state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
                if int(group) == self.process.pid and state != "Z":
                    alive.append(int(stat.parent.name))
        return alive

    def stop(self) -> list[int]:
        """Stop it as docker or systemd would, with SIGTERM; returns the processes that outlived it (then killed)."""
        import contextlib
        import signal
        import time

        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        finally:
            time.sleep(0.5)
            left = self.group()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        return left
