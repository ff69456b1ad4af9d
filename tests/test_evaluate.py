"""End-to-end tests of ensemble.evaluate on a tiny model set trained once per module."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from ensemble import evaluate as ev

METRIC_KEYS = {"auc", "ap", "eer", "acc", "threshold", "tpr@fpr1", "tpr@fpr5", "ece", "brier", "n", "n_fake"}
PLOTS = ("roc.png", "score_hist.png", "reliability.png", "tsne.png", "gradcam.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def overrides(root, tmp: Path) -> list[str]:
    return [str(root), "threads=1", "data.image_size=64", "face.crop_size=80", "train.batch_size=16",
            "train.epochs=1", "experts=convnext,dae", "expert.convnext.model=test_convnext",
            "expert.dae.model=test_resnet", f"out={tmp / 'weights'}", f"run_dir={tmp / 'runs'}",
            f"data.cache_dir={tmp / 'cache'}"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, overrides, weights dir): two tiny experts + a stacker, trained once."""
    from data_prep.demo import build_demo
    from ensemble import fit
    from experts import train

    tmp = tmp_path_factory.mktemp("evaluate")
    root = build_demo(tmp / "data", seed=0, n_train=48, n_val=32, n_test=24, size=96)
    args = overrides(root, tmp)
    assert train.main(list(args)) == 0
    assert fit.main(list(args)) == 0
    manifest = json.loads((tmp / "weights" / "manifest.json").read_text())
    assert manifest["ensemble"]["stacker"]["experts"] == ["convnext", "dae"]
    return root, args, tmp / "weights"


@pytest.fixture(scope="module")
def testset_report(trained, tmp_path_factory):
    """One full CLI run on the testset (plots included), shared by the checks below."""
    root, args, weights = trained
    reports = tmp_path_factory.mktemp("reports")
    assert ev.main([*args, "--reports", str(reports), "--gradcam", "2"]) == 0
    return reports


def linked_root(root: Path, dest: Path) -> Path:
    """A data root sharing trainset/valset with `root` (symlinks) and a copied testset."""
    dest.mkdir()
    for name in ("trainset", "valset", "trainset_label.txt", "valset_label.txt"):
        os.symlink(root / name, dest / name)
    shutil.copytree(root / "testset", dest / "testset")
    return dest


def test_testset_metrics_json(trained, testset_report):
    root, _, _ = trained
    result = json.loads((testset_report / "metrics.json").read_text())
    assert result["split"] == "testset"
    assert result["n_images"] == result["n_scored"] == 24 and result["unreadable"] == []
    assert result["experts"] == ["convnext", "dae"]
    assert result["stacker"]["method"] in {"mean", "rank_mean", "logreg", "lgbm"}
    assert set(result["models"]) == {"convnext", "dae", "ensemble", "mean", "rank_mean"}
    labels = dict(csv.reader(open(root / "testset_label.txt")))
    n_fake = sum(v == "1" for k, v in labels.items() if k != "img_name")
    for name, row in result["models"].items():
        assert set(row) == METRIC_KEYS, name
        assert row["n"] == 24 and row["n_fake"] == n_fake
        assert 0.0 <= row["auc"] <= 1.0 and 0.0 <= row["acc"] <= 1.0 and 0.0 <= row["brier"] <= 1.0
        # accuracy is measured at the threshold chosen on the validation split
        assert row["threshold"] == pytest.approx(result["thresholds"][name])
    assert result["plot_errors"] == {}
    assert set(result["plots"].values()) == set(PLOTS)


def test_scores_csv_matches_metrics(testset_report):
    from common.metrics import evaluate_scores

    result = json.loads((testset_report / "metrics.json").read_text())
    # The mean baseline recomputed from the per-image scores gives the same test metrics.
    rows = list(csv.DictReader(open(testset_report / "scores.csv")))
    assert len(rows) == 24
    y = np.array([int(r["target"]) for r in rows])
    mean = (np.array([float(r["convnext"]) for r in rows]) + np.array([float(r["dae"]) for r in rows])) / 2
    expected = evaluate_scores(y, mean, result["thresholds"]["mean"])
    assert result["models"]["mean"]["auc"] == pytest.approx(expected["auc"], abs=1e-4)
    assert result["models"]["mean"]["acc"] == pytest.approx(expected["acc"])


def test_markdown_and_plots(testset_report, capsys):
    text = (testset_report / "metrics.md").read_text()
    for name in ("convnext", "dae", "ensemble", "mean", "rank_mean"):
        assert f"| {name} |" in text
    assert "| name | auc | ap | eer | acc |" in text
    for name in PLOTS:
        path = testset_report / name
        assert path.is_file() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_testset_without_labels_exits_2(trained, tmp_path, capsys):
    root, args, _ = trained
    unlabelled = linked_root(root, tmp_path / "data")
    code = ev.main([str(unlabelled), *args[1:], "--reports", str(tmp_path / "rep"), "--no-plots"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "testset" in err[-1] and "label" in err[-1]
    assert not (tmp_path / "rep" / "metrics.json").exists()


def test_unreadable_image_is_listed_and_excluded(trained, tmp_path):
    from configs import load_config

    root, args, weights = trained
    data = linked_root(root, tmp_path / "data")
    (data / "testset" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    labels = (root / "testset_label.txt").read_text()
    (data / "testset_label.txt").write_text(labels.rstrip("\n") + "\nbroken.jpg,1\n")
    cfg = load_config("cpu", [*args[1:], f"data_root={data}"])
    result = ev.evaluate(cfg, "testset", weights=weights, reports=tmp_path / "rep", plots=False)
    assert result["n_images"] == 25 and result["n_scored"] == 24
    assert [u["file"] for u in result["unreadable"]] == ["broken.jpg"]
    assert all(row["n"] == 24 for row in result["models"].values())
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["unreadable"][0]["file"] == "broken.jpg"
    assert not (tmp_path / "rep" / "roc.png").exists()


def test_failing_plot_keeps_metrics(trained, testset_report, tmp_path, monkeypatch):
    from common import plots
    from configs import load_config

    root, args, weights = trained
    monkeypatch.setattr(plots, "plot_roc", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    cfg = load_config("cpu", args[1:] + [f"data_root={root}"])
    result = ev.evaluate(cfg, "valset", weights=weights, reports=tmp_path, gradcam=0)
    assert "roc" in result["plot_errors"] and "boom" in result["plot_errors"]["roc"]
    assert "gradcam" not in result["plots"] and "score_hist" in result["plots"]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["split"] == "valset" and saved["n_scored"] == 32 and "optimistic" in saved["note"]
    assert set(saved["models"]["ensemble"]) == METRIC_KEYS
    # The testset run chose its thresholds on this same validation split.
    tested = json.loads((testset_report / "metrics.json").read_text())
    assert tested["thresholds"] == pytest.approx(saved["thresholds"])


def test_precision_bf16_is_recorded_and_moves_expert_scores_little(trained, testset_report, tmp_path):
    import torch

    from configs import load_config
    from ensemble.predictor import DEFAULT_PRECISION, resolve_precision

    root, args, weights = trained
    assert ev.parse_args([str(root), "--precision", "bf16"]).precision == "bf16"
    cfg = load_config("cpu", args[1:] + [f"data_root={root}"])
    result = ev.evaluate(cfg, "testset", weights=weights, reports=tmp_path, plots=False, precision="bf16")
    assert result["precision"] == "bf16"
    default = resolve_precision(DEFAULT_PRECISION, torch.device("cpu"))
    assert json.loads((testset_report / "metrics.json").read_text())["precision"] == default
    fp32_rows = list(csv.DictReader(open(testset_report / "scores.csv")))
    bf16_rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert [r["img_name"] for r in bf16_rows] == [r["img_name"] for r in fp32_rows]
    for expert in ("convnext", "dae"):
        difference = [abs(float(a[expert]) - float(b[expert])) for a, b in zip(fp32_rows, bf16_rows)]
        assert max(difference) < 0.05, expert


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5, (w, h))
    assert writer.isOpened()
    for rgb in frames:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


def test_video_metrics(trained, tmp_path):
    from configs import load_config
    from data_prep.images import decode_image

    root, args, weights = trained
    labels = [r for r in csv.reader(open(root / "testset_label.txt"))][1:]
    videos = tmp_path / "videos"
    videos.mkdir()
    for target in (0, 1):
        frames = [decode_image(root / "testset" / n) for n, t in labels if int(t) == target][:6]
        write_video(videos / f"clip{target}.mp4", frames)
    (videos / "labels.csv").write_text("video_name,target\nclip0.mp4,0\nclip1.mp4,1\n")
    cfg = load_config("cpu", args[1:] + [f"data_root={root}"])

    seen_frame_scores = []

    def brightness(tracked, frame_scores):  # stands in for a sequence model: one score from a video's crops
        seen_frame_scores.append(frame_scores)
        return float(np.mean([crop.mean() for crop in tracked.crops]) / 255)

    result = ev.evaluate(cfg, "testset", weights=weights, reports=tmp_path / "rep", videos=videos,
                         plots=False, frames=4, extra_video_scores={"brightness": brightness})
    video = result["video"]
    assert video["n_videos"] == 2 and video["n_frames"] == 8 and video["unreadable"] == []
    assert set(video["frame_level"]["ensemble"]) == METRIC_KEYS
    assert video["frame_level"]["ensemble"]["n"] == 8
    rules = ["mean", "median", "confidence", "max", "top-k"]
    assert list(video["video_level"]) == rules + ["brightness"]
    for rule in rules:
        for name in ("convnext", "dae", "ensemble", "mean"):
            row = video["video_level"][rule][name]
            assert row["n"] == 2 and row["n_fake"] == 1 and 0.0 <= row["auc"] <= 1.0
    assert video["video_level"]["brightness"]["brightness"]["n"] == 2
    for row in video["videos"]:
        assert 0 <= row["n_face_frames"] <= row["n_frames"] == 4
        assert {f"p_{rule}" for rule in rules + ["brightness"]} <= set(row)
        assert row["p_mean"] <= row["p_top-k"] <= row["p_max"]
    # the scorer is also given the ensemble's score of every frame: their mean is the rule `mean`
    assert [len(f) for f in seen_frame_scores] == [4, 4]
    assert [float(np.mean(f)) for f in seen_frame_scores] == pytest.approx([r["p_mean"] for r in video["videos"]])
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["video"]["video_level"]["top-k"]["ensemble"]["n"] == 2
    text = (tmp_path / "rep" / "metrics.md").read_text()
    assert "video level, rule `mean`" in text and "video level, rule `top-k`" in text

    from ensemble.video_eval import evaluate_videos, per_video_table
    table = per_video_table(video).splitlines()
    assert table[0] == "| video | label | frames with a face | mean | median | confidence | max | top-k | brightness |"
    assert table[2].startswith("| clip0.mp4 | real | ") and len(table) == 4
    with pytest.raises(ValueError, match="'max'"):  # an extra score never hides a frame rule
        evaluate_videos(None, videos, None, {}, 4, "ensemble", extra_video_scores={"max": brightness})
