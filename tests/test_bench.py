"""bench.speed and bench.quality on a tiny demo set and one tiny trained expert."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import pipeline_waits, quality, speed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(data root, weights dir, overrides): a tiny demo set and one tiny convnext expert."""
    from data_prep.demo import build_demo
    from experts import train

    tmp = tmp_path_factory.mktemp("bench")
    root = build_demo(tmp / "data", n_train=32, n_val=16, n_test=16, size=64)
    w, r, c = tmp / "weights", tmp / "runs", tmp / "cache"
    overrides = ["threads=1", "device=cpu", "data.image_size=48", "face.crop_size=56", "train.batch_size=8",
                 "train.epochs=1", "experts=convnext", "expert.convnext.model=test_convnext",
                 f"data.cache_dir={c}"]
    assert train.main([str(root), *overrides, f"out={w}", f"run_dir={r}"]) == 0
    return root, w, overrides


def test_speed(tiny, tmp_path):
    root, weights, overrides = tiny
    out = tmp_path / "speed.json"
    code = speed.main([str(root / "testset"), "--weights", str(weights), "--batch-size", "4", "--workers", "0",
                       "--threads", "1", "--repeats", "1", "--limit", "10", "--device", "cpu",
                       "--precision", "fp32", "--allow-contention", "--out", str(out),
                       "--train", str(root), "--train-epochs", "1", *overrides])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 10 and result["experts"] == ["convnext"] and result["threads"] == 1
    assert result["precision"] == "fp32"
    assert result["end_to_end"]["images_per_s"] > 0 and result["end_to_end"]["rows"] == 10
    assert result["end_to_end"]["scoring_images_per_s"] >= result["end_to_end"]["images_per_s"]
    assert result["bare"]["images_per_s"] > 0 and result["bare"]["batches"] == 3  # 4 + 4 + 2
    assert result["bare"]["experts"]["convnext"]["images_per_s"] > 0
    assert 0 < result["ratio"] and 0 < result["ratio_scoring"]
    assert result["memory"]["peak_rss_mb"] > 50
    startup = result["startup"]
    assert startup["load_s"] > 0 and startup["cold_infer"]["rc"] == 0 and startup["cold_infer"]["seconds"] > 0
    assert result["train"]["experts"]["convnext"]["images_per_s"] > 0
    assert result["machine"]["cpu_count"] >= 1 and "torch" in result["versions"]
    c = result["contention"]
    assert c["contended"] in (True, False) and result["contended"] == c["contended"] and c["allowed"]
    assert c["others_cores_before"] is not None and c["others_cores_during"] is not None


def test_pipeline_waits(tiny, capsys):
    """One pass through infer.py's loader with a worker, then the same batches bare: the
    waits and the forward passes add up to the pass, and every listed copy is scored."""
    root, weights, _ = tiny
    code = pipeline_waits.main([str(root / "testset"), "--weights", str(weights), "--copies", "2",
                                "--batch-size", "8", "--workers", "1", "--threads", "1", "--device", "cpu"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 32 and result["workers"] == 1 and result["threads"] == 1
    assert 0 < result["first_wait_s"] <= result["wait_s"]
    assert result["wait_s"] + result["compute_s"] <= result["pipeline_s"] + 1e-3
    assert result["bare_s"] > 0  # the JSON's seconds are rounded to 1 ms, its ratio computed before
    rounding = 0.002 / result["pipeline_s"] + 1e-3
    assert result["ratio"] == pytest.approx(result["bare_s"] / result["pipeline_s"], abs=rounding)


def test_contention_verdict():
    assert speed.contention_verdict(0.1, 0.2, 0.0, [0.0, 0.6, 0.1, 0.2, 0.1, 0.0, 0.1, 0.2, 0.1, 0.3, 0.0])[0] is False
    contended, reasons = speed.contention_verdict(0.1, 0.7, 0.0, [])
    assert contended and "during the run" in reasons[0]
    assert speed.contention_verdict(0.0, 0.2, 0.0, [0.9, 0.9, 0.0, 0.0])[0] is True  # busy windows
    assert speed.contention_verdict(None, None, None, [])[0] is None


def test_others_cores_excludes_own_work():
    a = speed.CpuSnapshot(wall=0.0, busy=10.0, own=1.0)
    b = speed.CpuSnapshot(wall=2.0, busy=13.0, own=3.0)  # 3 busy s, 2 of them ours
    assert speed.others_cores(a, b) == pytest.approx(0.5)
    assert speed.others_cores(a, speed.CpuSnapshot(2.0, None, 3.0)) is None


def test_speed_fails_when_contended(tiny, tmp_path, monkeypatch):
    root, weights, _ = tiny
    monkeypatch.setattr(speed, "sample_others", lambda seconds=1.0: 1.5)  # a busy neighbour
    out = tmp_path / "speed.json"
    args = [str(root / "testset"), "--weights", str(weights), "--batch-size", "8",
            "--repeats", "1", "--limit", "4", "--no-cold", "--device", "cpu", "--out", str(out)]
    assert speed.main(args) == speed.EXIT_CONTENDED
    result = json.loads(out.read_text())
    assert result["contended"] is True and result["contention"]["reasons"]
    # no --workers: infer.py's default for the device the weights were loaded on
    from ensemble.predictor import default_decode_workers
    assert result["workers"] == default_decode_workers(torch.device("cpu"))


def test_speed_usage_errors(tmp_path):
    assert speed.main([str(tmp_path / "missing")]) == 2
    assert speed.main([str(tmp_path), "train.epochs=2"]) == 2  # overrides need --train
    assert speed.main([str(tmp_path), "--weights", str(tmp_path / "none"), "--no-cold"]) == 2  # no images


def test_quality(tiny, tmp_path):
    root, weights, overrides = tiny
    out = tmp_path / "quality.md"
    assert quality.main([str(root), "--weights", str(weights), "--out", str(out), *overrides]) == 0
    text = out.read_text()
    assert f"`{root}`" in text and "testset" in text and "command: `python -m bench.quality" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| name | auc | ap | eer | acc | tpr@fpr1 | tpr@fpr5 | ece | brier")
    names = [line.split("|")[1].strip() for line in table[1:]]
    assert names == ["convnext", "ensemble", "mean", "rank_mean"]
    assert quality.main([str(tmp_path / "no_data"), "--weights", str(weights), "--out", str(out)]) == 2


def test_benchmarks_run_as_modules_from_the_repository_root():
    for module in ("bench.speed", "bench.quality"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python -m {module}")


def test_video_resolution_runs_on_a_short_clip(capsys):
    """The 4K preprocessing benchmark end to end on a 2-frame clip: both tables, and the
    tracked, capped path finds the face the per-frame path finds."""
    from bench import video_resolution

    assert video_resolution.main(["--frames", "1", "--clip-frames", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| after: capped to 1920, tracked, detected at 320 |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 4K frame", "| capped frame"))]
    assert len(rows) == 4 and all(int(row.rstrip(" |").rsplit("|", 1)[1]) >= 1 for row in rows)
    assert video_resolution.main(["--frames", "0"]) == 2
