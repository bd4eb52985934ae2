import json

import pytest

from fashionkp.cli import main
from fashionkp.data.fashionai import read_csv
from fashionkp.data.keypoints import CATEGORY_KEYPOINTS
from fashionkp.data.submission import read_submission, write_submission


def test_score_rejects_bad_submissions_with_exit_2(tmp_path, synth_data, capsys):
    answers = synth_data["answers"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_id,image_category\nImages/skirt/x.jpg,skirt,1_1_1\n")
    assert main(["score", str(answers), str(bad)]) == 2
    assert "bad.csv:2: 3 columns, a submission row needs 26" in capsys.readouterr().err
    assert main(["score", str(answers), str(tmp_path / "missing.csv")]) == 2


def test_perfect_submission_scores_zero_and_concat_round_trips(tmp_path, synth_data, capsys):
    records = read_csv(synth_data["answers"])
    import numpy as np

    pts = np.stack([np.nan_to_num(r.keypoints[:, :2], nan=0) for r in records])
    halves = [records[:5], records[5:]]
    files = []
    for i, part in enumerate(halves):
        files.append(write_submission(tmp_path / f"part{i}.csv", [r.image_id for r in part], [r.category for r in part],
                                      pts[:5] if i == 0 else pts[5:]))  # fmt: skip
    assert main(["concat", *map(str, files), "--out", str(tmp_path / "all.csv")]) == 0
    merged = read_submission(tmp_path / "all.csv")
    assert len(merged) == len(records)
    capsys.readouterr()
    assert main(["score", str(synth_data["answers"]), str(tmp_path / "all.csv")]) == 0
    assert "NE 0.0000%" in capsys.readouterr().out
    with pytest.raises(ValueError):
        write_submission(tmp_path / "x.csv", ["a"], ["skirt"], np.zeros((2, 24, 2)))


def test_draw_and_synth_commands(tmp_path, synth_data):
    out = tmp_path / "sheet.png"
    assert main(["draw", str(synth_data["train"]), "--out", str(out), "-n", "6"]) == 0
    import cv2

    assert cv2.imread(str(out)).shape[1] == 4 * 256
    assert main(["synth", str(tmp_path / "s"), "--n-per-category", "1"]) == 0
    assert (tmp_path / "s" / "train" / "Annotations" / "annotations.csv").is_file()


def test_predict_on_your_own_photos_from_the_command_line(tiny_checkpoints, synth_data, tmp_path):
    """The README's command, as printed: a config-group garment type and a single checkpoint path."""
    import shutil

    from conftest import run_cli

    photos = tmp_path / "my_photos"
    photos.mkdir()
    for source in sorted((synth_data["train"] / "Images" / "dress").glob("*.jpg"))[:2]:
        shutil.copy(source, photos / source.name)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 half a jpeg")
    shutil.copy(tiny_checkpoints["a"], tmp_path / "dress.ckpt")
    out = tmp_path / "out"
    done = run_cli("predict.py", ["checkpoints=[dress.ckpt]", "images=my_photos/", "clothes=dress",
                                  f"hydra.run.dir={out}"], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = (out / "points.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("image,category,neckline_left_x,neckline_left_y,neckline_left_score")
    assert all(",dress," in r for r in rows[1:])
    assert "broken.jpg" in done.stdout + done.stderr  # the unreadable photo is named
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["images"] == 2 and summary["failed"] == 1
    # one path without brackets is a list of one
    again = run_cli("predict.py", ["checkpoints=dress.ckpt", "images=my_photos/", "clothes=dress", "draw=0",
                                   f"hydra.run.dir={tmp_path / 'again'}"], cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "again" / "points.csv").read_text() == (out / "points.csv").read_text()


def test_photos_without_a_garment_type_get_the_models_answer(tiny_checkpoints, synth_data, tmp_path):
    """predict.py without clothes=: a clothes=all model's type head tells each photo's type (points.json says
    which, and how sure); evaluate.py given_types=false scores those points and the head's accuracy."""
    from conftest import run_cli
    from hydra import compose, initialize_config_dir

    from fashionkp.config import CONFIG_DIR
    from fashionkp.data.images import load_image
    from fashionkp.evaluation.evaluate import evaluate
    from fashionkp.inference.predictor import KeypointPredictor

    photos = sorted((synth_data["train"] / "Images").glob("*/*.jpg"))[:4]
    out = tmp_path / "out"
    done = run_cli("predict.py", [f"checkpoints=[{tiny_checkpoints['a']}]", f"images=[{','.join(map(str, photos))}]",
                                  "draw=0", f"hydra.run.dir={out}"], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["image"]: r for r in json.loads((out / "points.json").read_text())}
    told = KeypointPredictor([tiny_checkpoints["a"]]).predict_photos([load_image(p) for p in photos], [None] * 4)
    for i, photo in enumerate(photos):  # the Python API's answer, and the points of that type
        row = rows[str(photo)]
        assert not row["category_given"] and row["category"] == told.categories[i]
        assert row["category_probability"] == pytest.approx(told.type_probabilities[i].max(), rel=1e-5)
        assert len(row["keypoints"]) == len(CATEGORY_KEYPOINTS[row["category"]])
    metrics = {}
    for given in (True, False):
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("evaluate", overrides=[
                f"checkpoints=[{tiny_checkpoints['a']}]", f"data.root={synth_data['train']}", "num_workers=0",
                f"output_dir={tmp_path / str(given)}", "draw_worst=0", f"given_types={given}",
            ])  # fmt: skip
        evaluate(cfg)
        metrics[given] = json.loads((tmp_path / str(given) / "metrics.json").read_text())
    types = metrics[False]["garment_types"]
    assert types == metrics[True]["garment_types"] and types["images"] == metrics[True]["images"]
    assert sum(sum(row.values()) for row in types["confusion"].values()) == types["images"]
    if types["accuracy"] == 100:  # every type right: the same points, the same NE
        assert metrics[False]["ne"] == pytest.approx(metrics[True]["ne"])
    else:  # points of a wrongly told type are missed
        assert metrics[False]["ne"] > metrics[True]["ne"]
