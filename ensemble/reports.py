"""The report files of `ensemble.evaluate`: metrics.json, metrics.md and scores.csv.

Each is written atomically (`common.files.atomic_write`): an interrupted evaluation leaves
the previous report whole, never half of a new one. The plots are `ensemble.visuals`'.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from common.files import atomic_write
from common.metrics import markdown_table


def json_safe(value):
    """numpy numbers -> Python numbers, NaN and infinities -> null: what `json.dumps` takes."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    return value


def write_text_atomically(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_scores_csv(path: Path, names, y, scores: dict[str, np.ndarray]) -> None:
    """scores.csv: `img_name,target` and one column of P(fake) per model."""
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["img_name", "target", *scores])
        for i, name in enumerate(names):
            writer.writerow([name, int(y[i]), *(f"{float(p[i]):.6f}" for p in scores.values())])


def markdown_report(result: dict) -> str:
    """metrics.md (also printed): the metrics table of every model, then the per-method AUCs,
    the experts' score correlation and the video metrics when `result` holds them."""
    lines = [f"# Evaluation: {result['split']} ({result['n_scored']} of {result['n_images']} images scored)",
             "",
             f"Ensemble: {result['stacker']['method']}; experts: {', '.join(result['experts'])}. "
             f"Accuracy at each model's threshold chosen on {result['threshold_split']}.",
             ""]
    if result["note"]:
        lines += [f"Note: {result['note']}", ""]
    if result["unreadable"]:
        lines += [f"Unreadable (excluded): {len(result['unreadable'])} file(s), listed in metrics.json.", ""]
    lines.append(markdown_table(result["models"]))
    if result.get("per_method_auc"):
        methods = sorted({m for row in result["per_method_auc"].values() for m in row})
        lines += ["", "AUC per manipulation method (its fakes against all the reals):", "",
                  "| model | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        lines += [f"| {model} | " + " | ".join(f"{row.get(m, float('nan')):.4f}" for m in methods) + " |"
                  for model, row in result["per_method_auc"].items()]
    corr = result.get("expert_correlation")
    if corr:
        names = list(corr)
        lines += ["", "Pearson correlation of the experts' scores:", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {a} | " + " | ".join(f"{corr[a][b]:.2f}" for b in names) + " |" for a in names]
    video = result.get("video")
    if video:
        lines += ["", f"## Videos: frame level ({video['n_frames']} frames of {video['n_videos']} videos)", "",
                  markdown_table(video["frame_level"])]
        for rule, table in video["video_level"].items():
            lines += ["", f"## Videos: video level, rule `{rule}` ({video['n_videos']} videos)", "",
                      markdown_table(table)]
        if video["unreadable"]:
            lines += ["", f"Unreadable videos (excluded): {len(video['unreadable'])}."]
    return "\n".join(lines) + "\n"




def write_metrics(reports: Path, result: dict) -> None:
    """metrics.json and metrics.md in `reports`, each written atomically."""
    write_text_atomically(reports / "metrics.json", json.dumps(json_safe(result), indent=2))
    write_text_atomically(reports / "metrics.md", markdown_report(result))
