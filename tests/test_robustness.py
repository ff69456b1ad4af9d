"""bench.robustness: degraded copies (JPEG, rescale) of a labelled split, and the AUC table of
the session's trained ensemble on them. The evaluations run in this process (the command runs
them as subprocesses), so no new training and no fresh torch import happen here."""
from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from bench import robustness
from data_prep.dataset import read_label_file
from data_prep.images import decode_image
from ensemble import evaluate as ev

BROKEN = "zz_broken.jpg"
PNG = "zz_lossless.png"


@pytest.fixture(scope="module")
def robust_root(tmp_path_factory, demo_root):
    """A copy of the demo set whose testset also has a PNG-named PNG image, an unreadable
    file and a methods file (reals `real`, fakes alternately Alpha and Beta)."""
    root = tmp_path_factory.mktemp("robustness") / "data"
    shutil.copytree(demo_root, root)
    test = root / "testset"
    first = sorted(test.iterdir())[0]
    Image.open(first).save(test / PNG, format="PNG")
    (test / BROKEN).write_bytes(b"this is not an image")
    labels = read_label_file(root / "testset_label.txt")
    labels.update({PNG: labels[first.name], BROKEN: 1})
    with open(root / "testset_label.txt", "w", newline="") as f:
        csv.writer(f).writerows([("img_name", "target"), *sorted(labels.items())])
    with open(root / "testset_methods.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["img_name", "method"])
        n = 0
        for name, target in sorted(labels.items()):
            writer.writerow([name, "real" if target == 0 else ("Alpha", "Beta")[n % 2]])
            n += target
    return root


@pytest.fixture(scope="module")
def bench_run(robust_root, trained_ensemble, tmp_path_factory):
    """bench.robustness once, its evaluations run in-process; (work, stdout, commands)."""
    work = tmp_path_factory.mktemp("robustness_work")
    commands = []

    def in_process(cmd):
        assert cmd[1:3] == ["-m", "ensemble.evaluate"] and "--no-plots" in cmd
        commands.append(cmd)
        assert ev.main(cmd[3:]) == 0

    patch = pytest.MonkeyPatch()
    patch.setattr(robustness, "run", in_process)
    try:
        code = robustness.main([str(robust_root), "--weights", str(trained_ensemble["weights"]),
                                "--work", str(work), *trained_ensemble["overrides"]])
    finally:
        patch.undo()
    assert code == 0
    return work, commands


def test_degraded_copies_are_degraded(bench_run, robust_root):
    work, _ = bench_run
    source = robust_root / "testset"
    names = sorted(p.name for p in source.iterdir())
    for condition in ("jpeg40", "scale0.5"):
        out = work / condition / "testset"
        assert sorted(p.name for p in out.iterdir()) == names  # the names, .png included, unchanged
        for name in ("testset_label.txt", "testset_methods.csv"):
            assert (work / condition / name).read_bytes() == (robust_root / name).read_bytes()
        assert (out / BROKEN).read_bytes() == (source / BROKEN).read_bytes()  # copied as it is
    for name in names:
        if name == BROKEN:
            continue
        clean = decode_image(source / name)
        with Image.open(work / "jpeg40" / "testset" / name) as image:
            assert image.format == "JPEG"
        low = decode_image(work / "jpeg40" / "testset" / name)
        assert low.shape == clean.shape and np.abs(low.astype(int) - clean).mean() > 0.5
        with Image.open(work / "scale0.5" / "testset" / name) as image:
            assert image.format == "JPEG"
            assert image.size == (round(clean.shape[1] * 0.5), round(clean.shape[0] * 0.5))


def test_table_has_the_ensemble_and_every_expert(bench_run, trained_ensemble):
    work, commands = bench_run
    assert len(commands) == 3
    for cmd in commands:
        assert cmd[cmd.index("--weights") + 1] == str(trained_ensemble["weights"])
    result = json.loads((work / "robustness.json").read_text())
    assert list(result["conditions"]) == ["clean", "jpeg40", "scale0.5"]
    assert list(result["auc"]) == ["ensemble", "convnext", "dae"]
    for row in result["auc"].values():
        assert list(row) == ["clean", "jpeg40", "scale0.5"]
        assert all(v is not None and math.isfinite(v) for v in row.values())
    assert set(result["per_method_auc"]) == {"Alpha", "Beta"}
    assert result["unreadable"] == {"clean": 1, "jpeg40": 1, "scale0.5": 1}  # reported, not fatal
    for condition in result["conditions"]:
        metrics = json.loads((work / "reports" / condition / "metrics.json").read_text())
        assert metrics["models"]["ensemble"]["auc"] == pytest.approx(result["auc"]["ensemble"][condition])
    text = (work / "robustness.md").read_text()
    for model in ("ensemble", "convnext", "dae"):
        assert f"| {model} | " in text
    assert "| method | clean | jpeg40 | Δ jpeg40 | scale0.5 | Δ scale0.5 |" in text
    assert "| Alpha | " in text and "Unreadable images" in text
    ensemble_row = next(line for line in text.splitlines() if line.startswith("| ensemble |"))
    clean, jpeg, delta = (float(x) for x in ensemble_row.split("|")[2:5])
    assert delta == pytest.approx(jpeg - clean, abs=0.0011)
    assert all(len(cell.strip().split(".")[1]) == 3 for cell in ensemble_row.split("|")[2:-1])


def test_copies_are_reused(bench_run, robust_root):
    work, _ = bench_run
    counts = robustness.degraded_copy(robust_root, "testset", work / "jpeg40", robustness.jpeg(40))
    assert counts == {"made": 0, "reused": len(list((robust_root / "testset").iterdir())), "unreadable": 0}


@pytest.mark.parametrize("what", ["split", "weights"])
def test_missing_input_is_a_one_line_error(what, demo_root, trained_ensemble, tmp_path, capsys):
    args = [str(demo_root), "--work", str(tmp_path / "work"), "--weights", str(trained_ensemble["weights"])]
    if what == "split":
        args += ["--split", "nosuchsplit"]
    else:
        args[-1] = str(tmp_path / "no_weights")
    assert robustness.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert ("nosuchsplit: missing split folder" if what == "split" else "no trained weights") in err
    assert not (tmp_path / "work").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        robustness.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m bench.robustness") and "--jpeg" in out and "--scale" in out
