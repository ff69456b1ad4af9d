"""The generalization protocols: method subsets, reals-only training, any labelled test
folder, per-method AUC, and bench.generalization end to end on tiny models."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.dataset import DataLayoutError, load_splits, read_label_file
from ensemble import evaluate as ev
from helpers import tiny_overrides

METHODS = ("Alpha", "Beta")


def add_methods(root: Path) -> Path:
    """Write <split>_methods.csv: reals are `real`, fakes alternate between two methods."""
    for split in ("trainset", "valset", "testset"):
        labels = read_label_file(root / f"{split}_label.txt")
        with open(root / f"{split}_methods.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["img_name", "method"])
            n = 0
            for name, target in sorted(labels.items()):
                writer.writerow([name, "real" if target == 0 else METHODS[n % 2]])
                n += target
    return root


@pytest.fixture(scope="module")
def methods_root(tmp_path_factory, demo_root):
    root = tmp_path_factory.mktemp("methods") / "data"
    shutil.copytree(demo_root, root)
    return add_methods(root)


def test_methods_filter_keeps_only_the_named_methods(methods_root):
    full = load_splits(methods_root)
    only_alpha = load_splits(methods_root, methods=["real", "Alpha"])
    for split in ("trainset", "valset"):
        n_real = sum(s.target == 0 for s in full[split])
        assert sum(s.target == 0 for s in only_alpha[split]) == n_real
        assert 0 < sum(s.target == 1 for s in only_alpha[split]) < sum(s.target == 1 for s in full[split])
    assert len(only_alpha["testset"]) == len(full["testset"])  # the testset is never filtered


def test_methods_filter_errors_name_the_file(methods_root, demo_root):
    with pytest.raises(DataLayoutError, match="Gamma"):
        load_splits(methods_root, methods=["real", "Gamma"])
    with pytest.raises(DataLayoutError, match="trainset_methods.csv"):
        load_splits(demo_root, methods=["real"])


def test_reals_only_needs_permission(methods_root):
    with pytest.raises(DataLayoutError, match="both real"):
        load_splits(methods_root, methods=["real"])
    splits = load_splits(methods_root, methods=["real"], allow_real_only=True)
    assert all(s.target == 0 for s in splits["trainset"] + splits["valset"])


def test_labelled_folder_accepts_every_layout(methods_root, tmp_path):
    samples, methods = ev.labelled_folder(methods_root / "testset")
    assert len(samples) == len(read_label_file(methods_root / "testset_label.txt"))
    assert set(methods.values()) == {"real", *METHODS}
    assert len(ev.labelled_folder(methods_root)[0]) == len(samples)  # a data root: its testset
    folders = tmp_path / "rf"
    for target, sub in ((0, "real"), (1, "fake")):
        (folders / sub).mkdir(parents=True)
        for s in [s for s in samples if s.target == target][:3]:
            shutil.copy(s.path, folders / sub / s.name)
    got, methods = ev.labelled_folder(folders)
    assert sorted(s.target for s in got) == [0, 0, 0, 1, 1, 1] and methods is None
    with pytest.raises(ev.EvaluationError, match="no labels"):
        ev.labelled_folder(folders / "real")


def test_per_method_auc():
    names = ["r1", "r2", "a1", "b1"]
    y = np.array([0, 0, 1, 1])
    scores = {"m": np.array([0.1, 0.4, 0.9, 0.2])}
    table = ev.per_method_auc(names, y, scores, {"r1": "real", "r2": "real", "a1": "A", "b1": "B"})
    assert table == {"m": {"A": 1.0, "B": 0.5}}


def test_bench_protocols_end_to_end(methods_root, tmp_path):
    """a, b (one held-out method), c and d on tiny models; the table and the JSON agree."""
    from bench import generalization

    overrides = [o for o in tiny_overrides(tmp_path, epochs=1, experts="resnet")
                 if not o.startswith(("out=", "run_dir=", "reports="))]
    work = tmp_path / "work"
    code = generalization.main([str(methods_root), "--cross", str(methods_root / "testset"),
                                "--held-out", "Alpha", "--work", str(work), *overrides])
    assert code == 0
    result = json.loads((work / "generalization.json").read_text())
    assert result["methods"] == list(METHODS)
    assert set(result["a"]["resnet"]) == {"all", *METHODS}
    assert set(result["b"]["ensemble"]) == {"Alpha", "mean"}
    assert set(result["c"]["resnet"]) >= {*METHODS, "mean"}
    (cross,) = result["d"].values()
    # protocol d on the data set's own testset must equal protocol a's overall AUC
    assert cross["resnet"] == pytest.approx(result["a"]["resnet"]["all"])
    # c trained on reals + editing fakes only: its manifest says so
    manifest = json.loads((work / "c" / "weights" / "manifest.json").read_text())
    data = manifest["experts"]["resnet"]["training"]["data"]
    assert data["trainset"]["n_fake"] == 0 and data["valset"]["n_fake"] == 0
    # and its stacker learned from the validation reals and their editing fakes alone
    n_val = data["valset"]["n"]
    assert manifest["ensemble"]["stacker"]["fitted_on"] == (f"valset ({n_val} images, hold-out) + {n_val} "
                                                            f"editing fakes of its reals")
    assert set(result["c"]["ensemble"]) >= {*METHODS, "mean"}
    # any labelled folder, without a data root: thresholds fall back to 0.5
    reports = tmp_path / "foreign"
    assert ev.main(["--test", str(methods_root / "testset"), "--weights", str(work / "a" / "weights"),
                    "--reports", str(reports), "--no-plots", *overrides]) == 0
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["threshold_split"] == "none (0.5)" and set(metrics["thresholds"].values()) == {0.5}
    assert metrics["per_method_auc"]["resnet"]["Alpha"] == pytest.approx(result["a"]["resnet"]["Alpha"])
    assert "AUC per manipulation method" in (reports / "metrics.md").read_text()
    # a labelled split folder given as the only positional argument is the same test
    again = tmp_path / "positional"
    assert ev.main([str(methods_root / "testset"), "--weights", str(work / "a" / "weights"),
                    "--reports", str(again), "--no-plots", *overrides]) == 0
    assert json.loads((again / "metrics.json").read_text())["models"] == metrics["models"]
    text = (work / "generalization.md").read_text()
    assert "(a) in distribution" in text and "(b) leave one method out" in text
    assert "(c) reals + editing fakes only" in text and "(d) cross-dataset" in text


def test_bench_refuses_a_data_root_without_methods(demo_root, capsys):
    from bench import generalization

    assert generalization.main([str(demo_root), "--protocols", "a"]) == 2
    assert "trainset_methods.csv" in capsys.readouterr().err
