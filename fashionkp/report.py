"""Gather the validation NE of many runs (a Hydra multirun) into a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def collect(root: Path | str) -> list[dict]:
    """One row per run folder under ``root``: training runs (``result.json``) and evaluate.py runs
    (``metrics.json``), with their overrides and NE figures."""
    rows = []
    files = sorted([*Path(root).rglob("result.json"), *Path(root).rglob("metrics.json")])
    for result_file in files:
        run = result_file.parent
        result = json.loads(result_file.read_text())
        if result_file.name == "metrics.json":
            result = {"val_ne": result["ne"], "per_category": result["per_category"]}
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        best_file = run / "val_ne_best.json"
        best = json.loads(best_file.read_text()) if best_file.exists() else {}
        rows.append({
            "run": str(run.relative_to(root)) if run != Path(root) else run.name,
            "overrides": " ".join(o for o in overrides if not o.startswith(("data.root", "paths."))),
            "ne": best.get("ne", result.get("best_val_ne", result.get("val_ne"))),
            "per_category": best.get("per_category", result.get("per_category", {})),
            "steps": result.get("global_step"),
        })  # fmt: skip
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| run | overrides | NE % | steps |", "|---|---|---:|---:|"]
    for r in rows:
        ne = f"{100 * r['ne']:.2f}" if r["ne"] is not None else "-"
        lines.append(f"| {r['run']} | {r['overrides'] or '(defaults)'} | {ne} | {r['steps']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path | str) -> Path:
    from fashionkp.draw import plot_bars

    values = {(r["overrides"] or r["run"])[:40]: r["ne"] for r in rows if r["ne"] is not None}
    return plot_bars(values, path, "validation NE per run")
