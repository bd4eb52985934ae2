"""An installed wheel works from any folder: its Hydra configs travel inside the package."""

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_the_wheel_holds_the_configs_and_runs_from_another_folder(tmp_path):
    source = tmp_path / "src"  # build from a copy: the build leaves build/ and egg-info behind
    shutil.copytree(ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "*.egg-info", "build",
                                                  "__pycache__", ".pytest_cache", ".ruff_cache"))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, timeout=300)  # fmt: skip
    wheel = next((tmp_path / "dist").glob("fashionkp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fashionkp/conf/train.yaml" in names and "fashionkp/conf/backbone/senet154.yaml" in names
    target = tmp_path / "target"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import fashionkp; print(fashionkp.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert where.stdout.strip().startswith(str(target))  # the wheel's copy, not this checkout's
    done = subprocess.run([str(target / "bin" / "fashionkp-train"), "--cfg", "job", "clothes=dress",
                           "backbone=senet154"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "name: dress" in done.stdout and "name: legacy_senet154" in done.stdout
