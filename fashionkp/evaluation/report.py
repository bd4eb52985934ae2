"""Compare the runs of a sweep: overall and per-category validation NE in percent, read from whatever each
run left behind (val_ne_best.json, result.json, evaluate.py's metrics.json, the CSV logger, an offline wandb
run), with the overrides that tell the runs apart, as a table (Markdown and CSV) and a grouped bar chart."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import struct
import textwrap
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fashionkp.data.keypoints import CATEGORIES

# Files that make a folder a run (besides a wandb/ folder of runs); the NE files in order of preference.
NE_FILES = ("val_ne_best.json", "result.json", "metrics.json", "csv/metrics.csv")
HYDRA_OVERRIDES = ".hydra/overrides.yaml"
RUN_MARKERS = (*NE_FILES, HYDRA_OVERRIDES)
# Old files without a "unit" key hold fractions: an NE under 1.5 there is a fraction, not 1.5%.
FRACTION_BELOW = 1.5
# wandb's .wandb file: a 7-byte header, then LevelDB-log records in 32 KiB blocks (each a protobuf Record).
_WANDB_IDENT = b":W&B"
_BLOCK = 32768
_HEADER = 7
_FULL, _LAST = 1, 4
# What a damaged or half-written file raises: such a run gets a note in the table, the report goes on.
_DAMAGED = (OSError, ValueError, KeyError, TypeError, yaml.YAMLError)


@dataclass
class Run:
    """One run folder and its NE in percent; ``ne`` is None when none was readable and ``note`` says why."""

    path: Path
    name: str
    ne: float | None = None
    per_category: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    source: str = ""
    note: str = ""
    overrides: list[str] = field(default_factory=list)
    overrides_from: str = ""
    distinct: list[str] = field(default_factory=list)


@dataclass
class _Reading:
    ne: float
    per_category: dict[str, float]
    steps: int | None
    source: str


def _percent(ne: Any, per_category: dict, unit: str | None, what: str) -> tuple[float, dict[str, float]]:
    """NE figures in percent: JSON files with ``"unit": "%"`` and logged metrics hold percent; JSON files from before
    the unit (no ``"unit"`` key) with NE < 1.5 hold fractions."""
    if isinstance(ne, bool) or not isinstance(ne, int | float) or not math.isfinite(ne):
        raise ValueError(f"{what} is {ne!r}")
    if unit is None:
        scale = 100.0 if ne < FRACTION_BELOW else 1.0
    elif unit == "%":
        scale = 1.0
    else:
        raise ValueError(f"unknown unit {unit!r}")
    values = {c: float(v) for c, v in per_category.items() if v not in (None, "") and math.isfinite(float(v))}
    return ne * scale, {c: v * scale for c, v in values.items()}


def _read_json_ne(path: Path, name: str, keys: tuple[str, ...]) -> _Reading | None:
    file = path / name
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    key = next((k for k in keys if k in data), None)
    if key is None:
        raise ValueError(f"no {' or '.join(keys)}")
    ne, per_category = _percent(data[key], data.get("per_category") or {}, data.get("unit"), key)
    return _Reading(ne, per_category, data.get("global_step"), name)


def _read_csv_logger(path: Path) -> _Reading | None:
    file = path / "csv" / "metrics.csv"
    if not file.is_file():
        return None
    with file.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/ne")]
    if not rows:
        raise ValueError("no row with val/ne")
    last = rows[-1]  # after fit, validate_best logs the best checkpoint's validation last
    per_category = {c: last.get(f"val/ne_{c}") for c in CATEGORIES}
    ne, per_category = _percent(float(last["val/ne"]), per_category, "%", "val/ne")  # logged in percent
    return _Reading(ne, per_category, int(last["step"]) if last.get("step") else None, "csv/metrics.csv")


def _wandb_runs(path: Path) -> list[Path]:
    """The wandb runs of a run folder, latest first (their names start with the start time)."""
    runs = [*path.glob("wandb/offline-run-*"), *path.glob("wandb/run-*")]
    return sorted(runs, key=lambda p: p.name.split("run-", 1)[1], reverse=True)


def _wandb_records(file: Path | str) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` file, up to the first damaged one (a run killed mid-write)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(file).read_bytes()
    if data[: len(_WANDB_IDENT)] != _WANDB_IDENT:
        raise ValueError(f"{file}: not a .wandb file")
    pos, chunks = _HEADER, []
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's last bytes, too few for a record header, are padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += _HEADER + length
        chunks.append(chunk)
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def _apply(target: dict, items: Any) -> None:
    """Apply wandb config/summary updates (``key`` or a ``nested_key`` path, JSON values) to a dict."""
    for item in items:
        *parents, last = [item.key] if item.key else list(item.nested_key)
        for key in parents:
            target = target.setdefault(key, {})
        target[last] = json.loads(item.value_json)


def read_wandb_file(file: Path | str) -> tuple[dict, dict]:
    """The config and the summary (last value of each logged key) of a run from its ``.wandb`` file.

    Offline, wandb 0.31 writes neither ``files/wandb-summary.json`` nor ``files/config.yaml``: everything is in
    the ``.wandb`` file (until ``wandb sync``).
    """
    config: dict = {}
    summary: dict = {}
    for record in _wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply(config, record.run.config.update)
        elif kind == "config":
            _apply(config, record.config.update)
        elif kind == "summary":
            _apply(summary, record.summary.update)
    return config, summary


def _wandb_run(run: Path) -> tuple[dict, dict, str]:
    """Config, summary and the file they came from: the JSON/YAML files where wandb wrote them, else the
    ``.wandb`` file."""
    summary_file, config_file = run / "files" / "wandb-summary.json", run / "files" / "config.yaml"
    if summary_file.is_file() and config_file.is_file():
        raw = yaml.safe_load(config_file.read_text()) or {}
        config = {k: v["value"] for k, v in raw.items() if isinstance(v, dict) and "value" in v}
        return config, json.loads(summary_file.read_text()), str(summary_file)
    file = next(run.glob("*.wandb"), None)
    if file is None:
        raise ValueError(f"{run.name}: no .wandb file")
    return (*read_wandb_file(file), str(file))


def _read_wandb(path: Path) -> _Reading | None:
    runs = _wandb_runs(path)
    if not runs:
        return None
    for run in runs:
        _, summary, source = _wandb_run(run)
        if "val/ne" in summary:
            per_category = {c: summary.get(f"val/ne_{c}") for c in CATEGORIES}
            ne, per_category = _percent(summary["val/ne"], per_category, "%", "val/ne")  # logged in percent
            return _Reading(ne, per_category, summary.get("trainer/global_step"), str(Path(source).relative_to(path)))
    raise ValueError("no val/ne in its summary")


_READERS = (
    ("val_ne_best.json", lambda p: _read_json_ne(p, "val_ne_best.json", ("ne",))),
    ("result.json", lambda p: _read_json_ne(p, "result.json", ("best_val_ne", "val_ne"))),
    ("metrics.json", lambda p: _read_json_ne(p, "metrics.json", ("ne",))),
    ("csv/metrics.csv", _read_csv_logger),
    ("wandb", _read_wandb),
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _config_overrides(config: dict) -> list[str]:
    """``key=value`` settings of a logged config. train.py logs ``{"config": <whole config>, "choices": <Hydra
    group choices>}`` (the rest is the module's hyperparameters, already inside "config"). Values under the
    run's own folder (checkpoint and log folders) say nothing about the run and are left out."""
    if "config" in config:
        settings = {**_flatten(config["config"]), **config.get("choices", {})}
    else:
        settings = _flatten({k: v for k, v in config.items() if not k.startswith("_")})
    own = settings.get("paths.output_dir")
    return [
        f"{k}={v if isinstance(v, str) else json.dumps(v)}"
        for k, v in settings.items()
        if not (own and isinstance(v, str) and v.startswith(own))
    ]


def _kept(override: str) -> bool:
    key = override.split("=", 1)[0]
    return key != "data.root" and not key.startswith(("paths.", "hydra."))


def read_overrides(path: Path | str) -> tuple[list[str], str]:
    """A run's overrides (``key=value``) and the file they came from: Hydra's ``.hydra/overrides.yaml``, else
    every setting of the config its wandb run kept; data.root, paths.* and hydra.* left out, a leading ``+``
    dropped."""
    path = Path(path)
    if (path / HYDRA_OVERRIDES).is_file():
        source = HYDRA_OVERRIDES
        overrides = [str(o) for o in yaml.safe_load((path / HYDRA_OVERRIDES).read_text()) or []]
    elif runs := _wandb_runs(path):
        config, _, source = _wandb_run(runs[0])
        source, overrides = str(Path(source).relative_to(path)), _config_overrides(config)
    else:
        return [], ""
    return [o.lstrip("+") for o in overrides if _kept(o.lstrip("+"))], source


def read_run(path: Path | str, name: str | None = None) -> Run:
    """The NE (percent, from the first readable file of val_ne_best.json, result.json, metrics.json,
    csv/metrics.csv, wandb/), the training steps and the overrides of one run folder."""
    path = Path(path)
    run = Run(path, name or path.name)
    problems = []
    try:
        run.overrides, run.overrides_from = read_overrides(path)
    except _DAMAGED as e:
        problems.append(f"overrides: {e}")
    for source, reader in _READERS:
        try:
            reading = reader(path)
        except _DAMAGED as e:
            problems.append(f"{source}: {e}")
            continue
        if reading is None:
            continue
        if run.steps is None:
            run.steps = reading.steps
        if run.ne is None:
            run.ne, run.per_category, run.source = reading.ne, reading.per_category, reading.source
        if run.ne is not None and run.steps is not None:
            break
    run.note = "; ".join(problems) or ("" if run.ne is not None else f"none of {', '.join(NE_FILES)}, wandb/")
    return run


def find_runs(root: Path | str) -> list[Path]:
    """Run folders under ``root`` (``root`` itself when it is one): folders with an NE file, a Hydra
    ``.hydra/overrides.yaml`` or a ``wandb/`` folder of runs."""
    found = []
    for folder, subfolders, _ in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != "wandb")
        here = Path(folder)
        if any((here / m).is_file() for m in RUN_MARKERS) or _wandb_runs(here):
            found.append(here)
    return found


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _name(path: Path, root: Path) -> str:
    """A run's name: its path under ``root``, where Hydra's ``<job number>_<overrides>`` sweep folders are
    shortened to the number (the overrides have a column of their own)."""
    relative = path.relative_to(root)
    if relative == Path("."):
        return path.resolve().name
    job = re.match(r"(\d+)_.", relative.name)
    return str(relative.parent / job[1]) if job else str(relative)


def collect(root: Path | str) -> list[Run]:
    """Every run under ``root``, best NE first (unreadable ones last), with the overrides that set each
    apart from the others in ``Run.distinct``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    runs = [read_run(p, _name(p, root)) for p in find_runs(root)]
    if not runs:
        raise FileNotFoundError(
            f"no runs under {root} (looked for {', '.join(RUN_MARKERS)} and wandb/ folders of offline runs)"
        )
    distinguish(runs)
    return sorted(runs, key=lambda r: (r.ne is None, r.ne or 0.0, _natural(r.name)))


def _canonical(value: str) -> str:
    """One spelling per value, so that Hydra's ``False``/``1e-3`` match a logged config's ``false``/``0.001``."""
    try:
        return repr(float(value))
    except ValueError:
        low = value.lower()
        return "null" if low in ("none", "~", "null") else low if low in ("true", "false") else value


def distinguish(runs: list[Run]) -> None:
    """Set ``Run.distinct``: the overrides whose setting is not the same in all runs (all of a lone run's).

    A setting differs when the runs give it different values, or when some Hydra runs override it and others
    leave it at the default. A run whose overrides are a whole logged config (no .hydra folder) only counts
    with the values it has: its hundred settings left at their defaults do not all stand out.
    """
    if len(runs) == 1:
        runs[0].distinct = list(runs[0].overrides)
        return
    settings = [dict(o.partition("=")[::2] for o in r.overrides) for r in runs]
    hydra = [s for r, s in zip(runs, settings, strict=True) if r.overrides_from == HYDRA_OVERRIDES]
    values: dict[str, set[str]] = {}
    for s in settings:
        for k, v in s.items():
            values.setdefault(k, set()).add(_canonical(v))
    partial = {k for s in hydra for k in s if any(k not in other for other in hydra)}
    for r in runs:
        keys = [o.partition("=")[0] for o in r.overrides]
        r.distinct = [o for o, k in zip(r.overrides, keys, strict=True) if len(values[k]) > 1 or k in partial]


def override_column(runs: list[Run]) -> tuple[str, list[str]]:
    """The header and cells of the overrides column: when the runs differ in one setting only (``ablation``),
    the header is its name and the cells its values (``ohkm_on``), else ``key=value`` lists."""
    keys = {o.split("=", 1)[0] for r in runs for o in r.distinct}
    if len(keys) == 1 and all(len(r.distinct) == 1 for r in runs):
        return keys.pop(), [r.distinct[0].split("=", 1)[1] for r in runs]
    return "overrides", [" ".join(r.distinct) or "(none)" for r in runs]


def categories(runs: list[Run]) -> list[str]:
    """The garment categories with an NE in at least one run, in the FashionAI order."""
    return [c for c in CATEGORIES if any(c in r.per_category for r in runs)]


def markdown_table(runs: list[Run]) -> str:
    """The runs as an aligned Markdown table: run, overrides, NE %, NE % per category, steps, source."""
    cats = categories(runs)
    header, cells = override_column(runs)
    lines = [["run", header, "NE %", *(f"{c} %" for c in cats), "steps", "from"]]
    for r, setting in zip(runs, cells, strict=True):
        ne = f"{r.ne:.2f}" if r.ne is not None else "-"
        per_category = [f"{r.per_category[c]:.2f}" if c in r.per_category else "" for c in cats]
        steps = "" if r.steps is None else str(r.steps)
        lines.append([r.name, setting, ne, *per_category, steps, r.source or r.note])
    lines = [[cell.replace("|", "\\|") for cell in line] for line in lines]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    numeric = range(2, 3 + len(cats) + 1)  # NE, the categories and steps are right-aligned

    def row(line: list[str]) -> str:
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    title = "Validation NE (normalized error) in %, lower is better; best run first."
    return "\n".join([title, "", row(lines[0]), rule, *map(row, lines[1:])])


def write_csv(runs: list[Run], path: Path | str) -> Path:
    """The table as CSV, NE in percent (``*_pct`` columns), with the run's folder and all its overrides."""
    cats = categories(runs)
    header, cells = override_column(runs)
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", header, "ne_pct", *(f"ne_{c}_pct" for c in cats), "steps", "source", "note",
                         "all_overrides", "overrides_from", "path"])  # fmt: skip
        for r, setting in zip(runs, cells, strict=True):
            writer.writerow([r.name, setting, "" if r.ne is None else round(r.ne, 4),
                             *(round(r.per_category[c], 4) if c in r.per_category else "" for c in cats),
                             "" if r.steps is None else r.steps, r.source, r.note, " ".join(r.overrides),
                             r.overrides_from, str(r.path)])  # fmt: skip
    return path


def plot(runs: list[Run], path: Path | str) -> Path | None:
    """Grouped bars, one group per run with an NE (best first): overall NE (labelled) and NE per category, in
    percent. None when no run has an NE."""
    from fashionkp.draw import pyplot, save_figure

    rated = [r for r in runs if r.ne is not None]
    if not rated:
        return None
    cats = categories(rated)
    _, cells = override_column(rated)
    series = [("overall", [r.ne for r in rated])]
    series += [(c, [r.per_category.get(c, math.nan) for r in rated]) for c in cats]
    plt = pyplot()
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 1.5 + len(rated) * (0.18 * len(series) + 0.4))), 4.8))
    for i, (label, values) in enumerate(series):
        x = [n + (i - (len(series) - 1) / 2) * width for n in range(len(rated))]
        bars = ax.bar(x, values, width, label=label, color="0.25" if i == 0 else f"C{i - 1}")
        if i == 0:
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    labels = [textwrap.fill(f"{r.name}: {setting}", 24) for r, setting in zip(rated, cells, strict=True)]
    crowded = len(rated) > 6
    ax.set_xticks(
        range(len(rated)), labels, fontsize=8, rotation=30 if crowded else 0, ha="right" if crowded else "center"
    )
    ax.set_ylabel("NE (%)")
    ax.set_ylim(0, 1.3 * max(v for _, values in series for v in values if math.isfinite(v)))
    ax.legend(ncol=len(series), fontsize=8, loc="upper left")
    ax.set_title("validation NE per run (%, lower is better)")
    return save_figure(plt, fig, path)


def write_report(root: Path | str, out: Path | str | None = None) -> tuple[str, dict[str, Path]]:
    """Collect the runs under ``root`` and write ``report.md``, ``report.csv`` and ``report.png`` (when a run
    has an NE) into ``out`` (default ``root``); returns the table and the written files."""
    runs = collect(root)
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (out / "report.md").write_text(table + "\n")
    paths = {"table": out / "report.md", "csv": write_csv(runs, out / "report.csv")}
    chart = plot(runs, out / "report.png")
    if chart is not None:
        paths["chart"] = chart
    return table, paths
