"""`fashionkp report`: the NE (in %) of every kind of run folder, sorted, with the overrides that set runs apart."""

import csv
import shutil
from pathlib import Path

import pytest
import yaml

from fashionkp.cli import main
from fashionkp.evaluation.report import collect, read_wandb_file

COMMON = ["experiment=fashionai_cpu", "trainer.accelerator=gpu", "data.root=/data/split", "paths.log_dir=/logs"]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _hydra(run: Path, *overrides: str) -> None:
    _write(run / ".hydra" / "overrides.yaml", "".join(f"- {o}\n" for o in [*overrides, *COMMON]))


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory) -> Path:
    """A folder holding a real offline wandb run as train.py's WandbLogger leaves one: the config under "config"
    and the Hydra choices under "choices", val/ne in %, records over several 32 KiB blocks."""
    wandb = pytest.importorskip("wandb")
    folder = tmp_path_factory.mktemp("wandb_run")
    config = {
        "config": {"resolution": 256, "seed": 42, "paths": {"output_dir": str(folder)}, "data": {"root": "/data/x"},
                   "callbacks": {"ne_report": {"out_dir": str(folder)}}},
        "choices": {"ablation": "res256", "experiment": "fashionai_cpu", "clothes": "all"},
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        run = wandb.init(dir=folder, mode="offline", project="fashionkp", config=config, tags=["ablation=res256"],
                         reinit="create_new")  # fmt: skip
        run.log({"val/ne": 13.0, "val/ne_skirt": 12.0, "trainer/global_step": 50})
        for step in range(400):
            run.log({"train/loss": 1.0 / (step + 1), "trainer/global_step": 50 + step})
        # A 70 kB value makes the last records longer than a block: split in FIRST, MIDDLE and LAST pieces.
        last = {"val/ne": 12.5, "val/ne_skirt": 12.25, "val/ne_dress": 12.75, "trainer/global_step": 450}
        run.log({**last, "sample": "x" * 70000})
        run.finish()
        wandb.teardown()  # finish() can return before wandb-core has written the .wandb file's last block
    return folder


def test_wandb_file_reader_reads_config_and_summary_and_stops_at_a_torn_tail(wandb_run, tmp_path):
    file = next(wandb_run.glob("wandb/offline-run-*/*.wandb"))
    config, summary = read_wandb_file(file)
    assert summary["val/ne"] == 12.5 and summary["val/ne_dress"] == 12.75 and summary["trainer/global_step"] == 450
    assert summary["sample"] == "x" * 70000
    assert config["choices"]["ablation"] == "res256" and config["config"]["resolution"] == 256
    torn = tmp_path / "torn.wandb"
    torn.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # a run killed while writing
    assert read_wandb_file(torn)[1]["val/ne"] == 13.0


@pytest.fixture
def sweep(tmp_path, wandb_run) -> Path:
    """A Hydra ablation sweep whose runs left their NE in every way fashionkp knows."""
    root = tmp_path / "multirun" / "train" / "2026-01-01_00-00-00"
    _write(root / "multirun.yaml", "hydra: {}\n")
    run = root / "0_+ablation=baseline,trainer.accelerator=gpu"  # the best checkpoint's full breakdown
    _hydra(run, "+ablation=baseline")
    _write(run / "result.json", '{"val_ne": 10.2, "best_val_ne": 10.0, "global_step": 1200}')
    _write(run / "val_ne_best.json", '{"unit": "%", "ne": 9.5, "per_category": {"skirt": 9.0, "dress": 10.25}}')
    run = root / "1_+ablation=ohkm_on,trainer.accelerator=gpu"  # CSV logger only
    _hydra(run, "+ablation=ohkm_on")
    _write(run / "csv" / "metrics.csv", "epoch,step,train/loss,val/ne,val/ne_dress,val/ne_skirt\n"
           "0,10,0.5,,,\n0,49,,14.0,15.0,13.0\n1,60,0.4,,,\n1,99,,8.0,8.5,7.5\n")  # fmt: skip
    shutil.copytree(wandb_run / "wandb", root / "2_+ablation=res256" / "wandb")  # wandb offline only, no .hydra
    run = root / "3_+ablation=pos_weight_off,trainer.accelerator=gpu"  # written before NE files were in percent
    _hydra(run, "+ablation=pos_weight_off")
    _write(run / "result.json", '{"val_ne": 0.1643, "global_step": 900}')
    _write(run / "val_ne_best.json", '{"ne": 0.1621, "per_category": {"skirt": 0.15, "dress": 0.175}}')
    run = root / "4_+ablation=global_finest,trainer.accelerator=gpu"  # validation never ran
    _hydra(run, "+ablation=global_finest")
    _write(run / "result.json", '{"val_ne": NaN, "global_step": 3}')
    return root


def test_collect_reads_every_kind_of_run_in_percent_best_first(sweep):
    runs = collect(sweep)
    assert [r.name for r in runs] == ["1", "0", "2", "3", "4"]
    assert [r.ne for r in runs[:4]] == pytest.approx([8.0, 9.5, 12.5, 16.21]) and runs[4].ne is None
    assert runs[0].per_category == pytest.approx({"skirt": 7.5, "dress": 8.5})  # the csv's last val/ne row
    assert runs[1].per_category == pytest.approx({"skirt": 9.0, "dress": 10.25})  # val_ne_best.json over result.json
    assert runs[2].per_category == pytest.approx({"skirt": 12.25, "dress": 12.75})  # the wandb run's summary
    assert runs[3].per_category == pytest.approx({"skirt": 15.0, "dress": 17.5})  # fractions without a unit
    assert [r.steps for r in runs] == [99, 1200, 450, 900, None]
    assert [r.source for r in runs[:2]] == ["csv/metrics.csv", "val_ne_best.json"]
    assert runs[2].source.startswith("wandb/offline-run-") and runs[2].overrides_from.startswith("wandb/")
    # No .hydra folder: the logged config's settings, less data.root, paths.* and the run's own folders.
    assert runs[2].overrides == [
        "resolution=256",
        "seed=42",
        "ablation=res256",
        "experiment=fashionai_cpu",
        "clothes=all",
    ]
    assert "result.json: val_ne is nan" in runs[4].note
    # Shared overrides, data.root and paths.* drop out; the wandb run's whole config reduces to its ablation.
    assert [r.distinct for r in runs] == [["ablation=ohkm_on"], ["ablation=baseline"], ["ablation=res256"],
                                          ["ablation=pos_weight_off"], ["ablation=global_finest"]]  # fmt: skip


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_command_prints_and_writes_the_table_csv_and_chart(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [_cells(line) for line in printed.splitlines() if line.startswith("| ")]
    assert rows[0] == ["run", "ablation", "NE %", "dress %", "skirt %", "steps", "from"]
    assert rows[1] == ["1", "ohkm_on", "8.00", "8.50", "7.50", "99", "csv/metrics.csv"]
    assert rows[2] == ["0", "baseline", "9.50", "10.25", "9.00", "1200", "val_ne_best.json"]
    assert rows[4][:5] == ["3", "pos_weight_off", "16.21", "17.50", "15.00"]
    assert rows[5][:3] == ["4", "global_finest", "-"] and "val_ne is nan" in rows[5][-1]
    assert "in %" in printed.splitlines()[0]
    md, table_csv, png = out / "report.md", out / "report.csv", out / "report.png"
    assert f"table: {md}" in printed and f"csv: {table_csv}" in printed and f"chart: {png}" in printed
    assert "| 2   | res256" in md.read_text()
    with table_csv.open() as f:
        written = list(csv.DictReader(f))
    assert [r["ablation"] for r in written] == ["ohkm_on", "baseline", "res256", "pos_weight_off", "global_finest"]
    assert [r["ne_pct"] for r in written] == ["8.0", "9.5", "12.5", "16.21", ""]
    assert written[2]["ne_dress_pct"] == "12.75"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (sweep / "report.md").exists()


def test_a_synced_wandb_run_is_read_from_its_summary_and_config_files(tmp_path):
    """wandb sync (and online runs) leave files/wandb-summary.json and files/config.yaml next to the .wandb file."""
    _hydra(tmp_path / "0_baseline", "+ablation=baseline")
    _write(tmp_path / "0_baseline" / "result.json", '{"val_ne": 11.25, "global_step": 10}')
    files = tmp_path / "1_res160" / "wandb" / "run-20260101_000000-abcd1234" / "files"
    _write(files / "wandb-summary.json", '{"val/ne": 10.5, "val/ne_trousers": 10.0, "trainer/global_step": 20}')
    config = {"wandb_version": 1, "_wandb": {"value": {"cli_version": "0.31.0"}},
              "config": {"desc": None, "value": {"seed": 42, "data": {"root": "/d"}}},
              "choices": {"desc": None, "value": {"ablation": "res160"}}}  # fmt: skip
    _write(files / "config.yaml", yaml.safe_dump(config))
    runs = collect(tmp_path)
    assert [(r.name, r.ne, r.steps) for r in runs] == [("1", pytest.approx(10.5), 20), ("0", 11.25, 10)]
    assert runs[0].per_category == pytest.approx({"trousers": 10.0})  # logged metrics are in percent
    assert runs[0].source == "wandb/run-20260101_000000-abcd1234/files/wandb-summary.json"
    assert runs[0].overrides == ["seed=42", "ablation=res160"]
    assert [r.distinct for r in runs] == [["ablation=res160"], ["ablation=baseline"]]


def test_evaluate_runs_differing_in_one_setting_and_a_single_run_folder(tmp_path):
    for name, metrics, overrides in [
        ("0_decoder=dark", '{"unit": "%", "ne": 9.36, "per_category": {"blouse": 9.0}}', ["decoder=dark"]),
        ("1_decoder=argmax,flip_test=False", '{"ne": 0.1189, "per_category": {"blouse": 0.12}}',
         ["decoder=argmax", "flip_test=False"]),
    ]:  # fmt: skip
        _write(tmp_path / name / "metrics.json", metrics)
        _write(
            tmp_path / name / ".hydra" / "overrides.yaml",
            "".join(f"- {o}\n" for o in ["checkpoints=[a.ckpt]", *overrides]),
        )
    runs = collect(tmp_path)
    assert [(r.name, r.ne, r.per_category, r.steps) for r in runs] == [
        ("0", pytest.approx(9.36), pytest.approx({"blouse": 9.0}), None),
        ("1", pytest.approx(11.89), pytest.approx({"blouse": 12.0}), None),
    ]
    # flip_test is set in one run only: it stands out though no other run gives it another value.
    assert [r.distinct for r in runs] == [["decoder=dark"], ["decoder=argmax", "flip_test=False"]]
    (alone,) = collect(tmp_path / "0_decoder=dark")  # a run folder on its own keeps all its overrides
    assert alone.name == "0_decoder=dark" and alone.distinct == ["checkpoints=[a.ckpt]", "decoder=dark"]


def test_a_folder_without_runs_is_exit_2_naming_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fashionkp report: error: no runs under {empty} ") and err.count("\n") == 1
    assert not (empty / "report.md").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
