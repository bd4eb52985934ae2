"""The README as a test: every command block of README.md runs as printed, on synthetic data and tiny checkpoints.

The commands are collected from README.md at import time: each line of a ```bash block (comment lines skipped, a
trailing ``# comment`` stripped) and the ```python block as one script. Each runs through the first RULES entry
that matches it, and test_every_readme_command_has_a_rule fails for a command that none matches, so a new README
command cannot go unrun. Only data and checkpoint paths are substituted (the files a command names are made in
its working folder); training commands get SHRINK appended and are slow (make test-slow, make test-all).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, ServeProcess, compose_train
from omegaconf import OmegaConf

from fashionkp.data.keypoints import CATEGORIES, CATEGORY_KEYPOINTS
from fashionkp.inference.precision import read_info

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
# The README's data paths, substituted by synthetic splits.
DATA_PATHS = ("/data/fashionai/train", "/data/fashionai/train2", "/data/r2_test_b/test.csv")
# What <run> and <sweep> become: a folder name as Hydra writes them.
RUN = "2018-06-01_12-00-00"
# Appended to every training command, after the printed overrides so that they also win over what experiment= and
# ablation= configs set: a real CPN step in about a second on 2 CPU cores.
SHRINK = [
    "backbone.pretrained=false", "resolution=64", "model.width=16", "data.num_workers=0", "data.batch_size=4",
    "trainer.max_epochs=1", "callbacks.progress_bar.refresh_rate=0", "validate_best=false",
]  # fmt: skip
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Command:
    block: int  # index of its fenced block in README.md
    text: str


def readme_blocks() -> list[tuple[str, str]]:
    return FENCE.findall(README.read_text())


def readme_commands() -> list[Command]:
    commands = []
    for block, (language, body) in enumerate(readme_blocks()):
        if language == "python":
            commands.append(Command(block, body))
            continue
        for line in body.splitlines():
            text = re.sub(r"\s+#.*", "", line).strip()
            if text and not text.startswith("#"):
                commands.append(Command(block, text))
    return commands


def shrink(args: list[str]) -> list[str]:
    # logger=csv spares a wandb run per job; a command that sets the logger keeps it
    return [*SHRINK, *([] if any(a.startswith("logger") for a in args) else ["logger=csv"])]


def hydra_main(module: str, args: list[str], out: Path) -> int:
    """Run a Hydra entry point in this process as its console script would (no ~6 s of imports per command), its
    run or sweep folder at ``out``; returns the exit status."""
    main = getattr(importlib.import_module("fashionkp.commands"), f"{module}_main")
    # Hydra's log handlers would outlive pytest's captured streams: keep them off in-process.
    argv = [module, *args, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [*argv, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"])
        try:
            main()
        except SystemExit as done:
            return done.code or 0
    return 0  # Hydra returns normally on success


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun over ``overrides`` (no ``-m``), as Hydra's basic sweeper splits them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]


def script_args(text: str) -> tuple[str, list[str]]:
    """``python train.py a=1 b=2`` -> ("train", ["a=1", "b=2"]): the command of ``fashionkp.commands``."""
    words = shlex.split(text)
    return Path(words[1]).stem, words[2:]


def dress_photos(synth_data) -> list[Path]:
    return sorted((synth_data["train"] / "Images" / "dress").glob("*.jpg"))


@pytest.fixture(scope="module")
def second_split(synth_data, tmp_path_factory) -> Path:
    """A second training split for data.root=[a,b]: another seed, so other image ids (fashionkp refuses an id
    that is in two splits)."""
    from fashionkp.data.synth import generate

    split = generate(tmp_path_factory.mktemp("second"), 4, 1, seed=8, progress=False)["train"]
    ids = [{p.relative_to(s).as_posix() for p in s.glob("Images/*/*.jpg")} for s in (split, synth_data["train"])]
    assert not ids[0] & ids[1]
    return split


@pytest.fixture(scope="module")
def submissions(synth_data, tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """submission.csv: predict.py on the synthetic test split; blouse.csv, dress.csv: its rows of one type."""
    out = tmp_path_factory.mktemp("submission")
    args = [f"checkpoints=[{tiny_checkpoints['a']}]", f"test_csv={synth_data['test_csv']}", "draw=0", "num_workers=0"]
    assert hydra_main("predict", args, out) == 0
    header, *rows = (out / "submission.csv").read_text().splitlines(keepends=True)
    files = {"submission": out / "submission.csv"}
    for category in ("blouse", "dress"):
        files[category] = out / f"{category}.csv"
        files[category].write_text(header + "".join(r for r in rows if r.split(",")[1] == category))
    return files


@pytest.fixture(scope="module")
def tiny_sweep(synth_data, tmp_path_factory) -> Path:
    """A sweep folder of train.py -m: two ablations of the CPU recipe, one batch each."""
    out = tmp_path_factory.mktemp("sweep")
    args = ["-m", "experiment=fashionai_cpu", f"data.root={synth_data['train']}", "ablation=baseline,ohkm_on"]
    assert hydra_main("train", [*args, *shrink(args), "debug=fdr"], out) == 0
    return out


@pytest.fixture(scope="module")
def readme_server(request, tmp_path_factory) -> Iterator[ServeProcess]:
    """The README's ``fashionkp serve`` command as printed (``--port`` appended: a free one), running while the
    commands that talk to it run."""
    pytest.importorskip("litserve", reason="the serve extra is not installed")
    text = next(c.text for c in COMMANDS if c.text.startswith("fashionkp serve "))
    cwd = tmp_path_factory.mktemp("readme_serve")
    args = shlex.split(Workspace(request, cwd, None, None).prepare(text))[2:]
    server = ServeProcess(args, cwd / "serve.log", cwd)
    try:
        server.wait_ready()
        yield server
    finally:
        left = server.stop()
    assert not left, f"fashionkp serve left processes running after SIGTERM: {left}"


class Workspace:
    """A command's working folder (the test's cwd) and what its handler needs: fixtures on demand, a folder for
    Hydra's run or sweep (``out``), monkeypatch and capsys."""

    def __init__(self, request, path: Path, monkeypatch, capsys) -> None:
        self.request, self.cwd, self.out = request, path, path / "hydra_out"
        self.monkeypatch, self.capsys = monkeypatch, capsys

    def fixture(self, name: str):
        return self.request.getfixturevalue(name)

    def prepare(self, text: str) -> str:
        """Make every file ``text`` names in the working folder; ``text`` with its data paths and <run>/<sweep>
        placeholders substituted."""
        unknown = set(re.findall(r"/data/[\w/.]+|<\w+>", text)) - {*DATA_PATHS, "<run>", "<sweep>"}
        assert not unknown, f"paths in a README command that the test does not substitute: {unknown}"
        synth = self.fixture("synth_data")
        for name in sorted(set(re.findall(r"(?<![\w/.])(\w+)\.ckpt\b", text))):
            # the clothes=all checkpoints serve every garment type; b has another input size (an ensemble of two)
            (self.cwd / f"{name}.ckpt").symlink_to(self.fixture("tiny_checkpoints")["b" if name == "b" else "a"])
        if "my_photos/" in text:
            (self.cwd / "my_photos").mkdir()
            for photo in dress_photos(synth)[:3]:
                shutil.copy(photo, self.cwd / "my_photos")
        if re.search(r"\bphoto\.jpg\b", text):
            shutil.copy(dress_photos(synth)[0], self.cwd / "photo.jpg")
        if re.search(r"\banswers\.csv\b", text):
            shutil.copy(synth["answers"], self.cwd / "answers.csv")
        for name in re.findall(r"\b(submission|blouse|dress)\.csv\b", text):
            shutil.copy(self.fixture("submissions")[name], self.cwd / f"{name}.csv")
        runs = self.cwd / "outputs"
        if "outputs/train/<run>/wandb/" in text:  # an offline wandb run to sync
            self.train_tiny([f"data.root={synth['train']}", "logger=wandb"], runs / "train" / RUN)
        elif "outputs/train/<run>" in text:
            (runs / "train").mkdir(parents=True)
            (runs / "train" / RUN).symlink_to(self.fixture("tiny_checkpoints")["a"].parent.parent)
        if "outputs/fashionai_cpu/<run>" in text:  # a run of the recipe to resume
            self.train_tiny(["experiment=fashionai_cpu", f"data.root={synth['train']}"], runs / "fashionai_cpu" / RUN)
        for task in re.findall(r"outputs/multirun/(\w+)/<sweep>", text):
            shutil.copytree(self.fixture("tiny_sweep"), runs / "multirun" / task / RUN)
        if "/data/fashionai/train2" in text:
            text = text.replace("/data/fashionai/train2", str(self.fixture("second_split")))
        text = text.replace("/data/fashionai/train", str(synth["train"]))
        text = text.replace("/data/r2_test_b/test.csv", str(synth["test_csv"]))
        return text.replace("<run>", RUN).replace("<sweep>", RUN)

    def train_tiny(self, args: list[str], run: Path) -> None:
        assert hydra_main("train", [*args, *shrink(args)], run) == 0

    def without_wandb_account(self) -> None:
        self.monkeypatch.delenv("WANDB_API_KEY", raising=False)
        self.monkeypatch.delenv("WANDB_MODE", raising=False)
        self.monkeypatch.setenv("NETRC", str(self.cwd / "no-netrc"))


def make_demo(ws: Workspace, text: str) -> None:
    # make demo writes outputs/demo under the folder it runs in: the repository's Makefile, run from the workspace
    if not (ROOT / ".venv").is_dir():
        pytest.skip("no .venv in the checkout (the Makefile's environment)")
    for name in ("Makefile", "pyproject.toml", ".venv"):
        (ws.cwd / name).symlink_to(ROOT / name)
    # a stale stamp would make `make` reinstall .venv from this folder, which holds no package
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=ws.cwd).returncode:
        pytest.skip(".venv/.installed is older than pyproject.toml: run `make install` (make test-all does)")
    done = subprocess.run(shlex.split(text), cwd=ws.cwd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((ws.cwd / "outputs" / "demo" / "demo_summary.json").read_text())
    for key in ("checkpoint", "submission", "training curve", "drawn predictions"):
        assert (ws.cwd / summary[key]).is_file(), key
    assert math.isfinite(float(summary["test NE"].rstrip("%")))


def the_test_suite(ws: Workspace, text: str) -> None:
    pytest.skip("this is the test suite")


def activate(ws: Workspace, text: str) -> None:
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        pytest.skip("the environment is not .venv in the checkout")
    done = subprocess.run(["bash", "-c", f"{text} && command -v python fashionkp wandb"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    # then python, fashionkp and wandb are the project's
    assert {Path(p).parent.resolve() for p in done.stdout.split()} == {(ROOT / ".venv" / "bin").resolve()}


def slurm_sweep_composes(ws: Workspace, text: str) -> None:
    """Needs a SLURM cluster: each job's config is composed as the multirun would and its launcher checked."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    _, args = script_args(ws.prepare(text))
    configs = [compose_train(job, ws.out, hydra_config=True) for job in sweep_jobs([a for a in args if a != "-m"])]
    assert sorted(cfg.clothes.name for cfg in configs) == sorted(CATEGORIES)
    for cfg in configs:
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
        assert (launcher["partition"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == ("gpu", 4, 4)


def online_wandb_needs_an_account(ws: Workspace, text: str) -> None:
    module, args = script_args(ws.prepare(text))
    ws.without_wandb_account()
    # shrunk all the same: offline, the default backbone's ImageNet weights would be refused first
    assert hydra_main(module, [*args, *shrink(args)], ws.out) == 2
    assert ws.capsys.readouterr().err.strip().splitlines() == [
        "fashionkp-train: error: logger.wandb.offline=False: online wandb needs an account on this machine (run "
        "`wandb login` first (or set WANDB_API_KEY), or keep logger.wandb.offline=true and `wandb sync` the run later)"
    ]


def train(ws: Workspace, text: str) -> None:
    module, args = script_args(ws.prepare(text))
    extra = shrink(args)
    if "hparams_search=optuna" in args:
        extra.append("hydra.sweeper.n_trials=2")
    if "experiment=fashionai_gpu" in args and not torch.cuda.is_available():
        extra.append("trainer.accelerator=cpu")  # the GPU recipe's one step, on this machine's CPU
    resumed = next((a.split("=", 1)[1] for a in args if a.startswith("ckpt_path=")), None)
    if resumed:
        extra.append("trainer.max_epochs=2")  # one epoch more than the run it resumes
    assert hydra_main(module, [*args, *extra], ws.out) == 0
    if "hparams_search=optuna" in args:
        assert (ws.out / "optimization_results.yaml").is_file()
        runs = [ws.out / str(trial) for trial in range(2)]
    elif "-m" in args:
        runs = sorted(p.parent for p in ws.out.glob("*/result.json"))
        assert len(runs) == len(sweep_jobs([a for a in args if a != "-m"]))
    else:
        runs = [ws.out]
    for run in runs:
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        assert (cfg.resolution, cfg.trainer.max_epochs) == (64, 2 if resumed else 1)  # the shrink won
        result = json.loads((run / "result.json").read_text())
        assert math.isfinite(result["val_ne"]), run
    if resumed:
        first = json.loads((ws.cwd / resumed / "result.json").read_text())
        assert result["global_step"] == 2 * first["global_step"]


def infer(ws: Workspace, text: str) -> None:
    from fashionkp.data.submission import read_submission

    module, args = script_args(ws.prepare(text))
    assert hydra_main(module, args, ws.out) == 0
    if module == "evaluate":
        jobs = len(sweep_jobs([a for a in args if a != "-m"])) if "-m" in args else 1
        metrics = sorted(ws.out.glob("**/metrics.json"))
        assert len(metrics) == jobs
        assert all(json.loads(m.read_text())["unit"] == "%" for m in metrics)
        return
    given = dict(a.split("=", 1) for a in args)
    if "images" in given:
        rows = (ws.out / "points.csv").read_text().splitlines()
        assert len(rows) == 1 + len(list(Path(given["images"]).iterdir()))
    else:
        images = len(Path(given["test_csv"]).read_text().splitlines()) - 1
        assert len(read_submission(ws.out / "submission.csv")) == images


def fashionkp(ws: Workspace, text: str) -> None:
    from fashionkp.cli import main
    from fashionkp.data.fashionai import read_csv
    from fashionkp.data.submission import read_submission

    argv = shlex.split(ws.prepare(text))[1:]
    assert main(argv) == 0
    out = ws.capsys.readouterr().out
    command, first = argv[:2]
    if command == "score":
        assert re.search(r"^NE \d+\.\d{4}%", out, re.MULTILINE), out
    elif command == "draw":
        assert (ws.cwd / out.strip().rsplit(" -> ", 1)[1]).is_file()
    elif command == "synth":
        annotations = Path(first) / "train" / "Annotations" / "annotations.csv"
        assert len(read_csv(annotations)) == len(CATEGORIES) * int(argv[argv.index("--n-per-category") + 1])
    elif command == "concat":
        parts = [read_submission(ws.cwd / p) for p in argv[1 : argv.index("--out")]]
        assert len(read_submission(argv[-1])) == sum(map(len, parts))
    elif command == "export":
        model = onnx.load(str(ws.cwd / argv[2]))
        info = read_info(model)
        choice = info["precision_choice"]  # the measurement behind precision=auto, where there is one
        if "--precision" in argv:
            assert info["precision"] == argv[argv.index("--precision") + 1]
        elif choice:  # an ONNX precision within the tolerance of fp32, and the fastest of those
            figures, limit = choice["figures"], choice["figures"]["fp32"]["ne"] + 0.1
            fits = {p: f for p, f in figures.items() if p != "bf16" and f["ne"] <= limit}
            assert min(fits, key=lambda p: fits[p]["ms_per_image"]) == info["precision"]
            assert f"precision=auto: {info['precision']}, measured on" in out, out
        else:
            assert info["precision"] == "fp32"
    elif command == "precision":
        assert "<- chosen" in out and (ws.cwd / f"{first}.precision.json").is_file()
    else:
        assert "ohkm_on" in (Path(first) / "report.md").read_text()  # the sweep's two ablations


def served(ws: Workspace, text: str) -> None:
    """The server runs until stopped: readme_server runs the command as printed; here its page is asked for."""
    server = ws.fixture("readme_server")
    with urllib.request.urlopen(f"{server.url}/", timeout=30) as page:
        assert b"<title>fashionkp" in page.read()


def curl_predict(ws: Workspace, text: str) -> None:
    """A curl call to the README's server, its printed address made the server's port."""
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    server = ws.fixture("readme_server")
    text = ws.prepare(text).replace("http://127.0.0.1:8000", server.url)
    done = subprocess.run(["bash", "-c", text], cwd=ws.cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert "points" in answer, answer
    assert len(answer["points"]) == len(CATEGORY_KEYPOINTS[answer["type"]["name"]])
    given = re.search(r"clothes=(\w+)", text)
    assert answer["type"]["predicted"] == (given is None)
    assert given is None or answer["type"]["name"] == given[1]


def wandb_login(ws: Workspace, text: str) -> None:
    # the venv's wandb has the subcommand; running it would wait for a key typed in
    done = subprocess.run([VENV_BIN / "wandb", *shlex.split(text)[1:], "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pytest.skip("wandb login is interactive and needs the wandb server")


def wandb_sync_needs_an_account(ws: Workspace, text: str) -> None:
    text = ws.prepare(text)
    assert len(list(ws.cwd.glob(text.split()[-1]))) == 1
    ws.without_wandb_account()
    # as in a shell where .venv is active, which expands the run's glob
    ws.monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", text], cwd=ws.cwd, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "API key" in output and "wandb login" in output, output


def python_api(ws: Workspace, text: str) -> None:
    script = ws.cwd / "readme_example.py"
    script.write_text(ws.prepare(text))
    points = runpy.run_path(str(script), run_name="__main__")["points"]
    assert points.shape == (24, 3)
    assert np.isfinite(points[:, 0]).sum() == len(CATEGORY_KEYPOINTS["dress"])  # NaN outside the category


@dataclass(frozen=True)
class Rule:
    pattern: str  # matched against the whole command
    handler: Callable[[Workspace, str], None]
    slow: bool = False


# The first rule that matches a command runs it.
RULES = [
    Rule(r"make demo", make_demo, slow=True),
    Rule(r"make test", the_test_suite),
    Rule(r"source \.venv/bin/activate", activate),
    Rule(r"python train\.py -m hydra/launcher=slurm_ddp .*", slurm_sweep_composes),
    Rule(r"python train\.py .*logger\.wandb\.offline=false.*", online_wandb_needs_an_account),
    Rule(r"python train\.py .*", train, slow=True),
    Rule(r"python (predict|evaluate)\.py .*", infer),
    # measuring precisions and calibrating int8 run the model over whole splits: slow
    Rule(r"fashionkp (precision .*|export .*--precision int8.*)", fashionkp, slow=True),
    Rule(r"fashionkp (score|draw|synth|concat|export|report) .*", fashionkp),
    Rule(r"fashionkp serve .*", served),
    Rule(r"curl .*http://127\.0\.0\.1:8000/predict.*", curl_predict),
    Rule(r"wandb login", wandb_login),
    Rule(r"wandb sync outputs/train/<run>/wandb/offline-run-\*", wandb_sync_needs_an_account, slow=True),
    Rule(r"from fashionkp\.inference import KeypointPredictor\n.*", python_api),
]
COMMANDS = readme_commands()


def rule_for(command: Command) -> Rule | None:
    return next((r for r in RULES if re.fullmatch(r.pattern, command.text, re.DOTALL)), None)


def test_every_readme_command_has_a_rule():
    assert {language for language, _ in readme_blocks()} == {"bash", "python"}  # no block without a runner
    assert not [c.text for c in COMMANDS if rule_for(c) is None], "README commands without a rule in RULES"
    used = {rule_for(c).pattern for c in COMMANDS}
    assert not [r.pattern for r in RULES if r.pattern not in used], "rules for commands the README no longer has"
    assert [c.text for c in COMMANDS if rule_for(c).handler is the_test_suite] == ["make test"]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(
            c,
            id=f"{c.block}:{c.text.splitlines()[0]}",
            marks=[pytest.mark.slow] if (r := rule_for(c)) and r.slow else [],
        )
        for c in COMMANDS
    ],
)
def test_readme_command(command, request, tmp_path, monkeypatch, capsys):
    rule = rule_for(command)
    assert rule, f"no rule runs README command {command.text!r}"
    monkeypatch.chdir(tmp_path)  # relative paths as printed
    rule.handler(Workspace(request, tmp_path, monkeypatch, capsys), command.text)
