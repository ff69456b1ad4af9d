"""Demo data set (layout, balance, determinism) and offline editing fakes added to a split (data_prep.make_fakes)."""
import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep.demo import SPLITS, build_demo
from data_prep.demo import main as demo_main
from data_prep.make_fakes import add_editing_fakes

SMALL = dict(n_train=12, n_val=6, n_test=6, size=48)


def read_rows(path):
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["img_name", "target"]
        return [(name, int(target)) for name, target in reader]


def all_files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), seed=0, **SMALL)


def test_layout_labels_and_balance(demo_root):
    for split, count in zip(SPLITS, (SMALL["n_train"], SMALL["n_val"], SMALL["n_test"])):
        rows = read_rows(demo_root / f"{split}_label.txt")
        assert len(rows) == count
        assert sum(target for _, target in rows) == count // 2  # balanced
        names = [name for name, _ in rows]
        assert len(set(names)) == count
        assert sorted(names) == sorted(p.name for p in (demo_root / split).iterdir())
        for name in names:
            assert name.endswith(".jpg")
            with Image.open(demo_root / split / name) as image:
                assert image.format == "JPEG" and image.size == (SMALL["size"], SMALL["size"])


def test_labels_are_shuffled(demo_root):
    targets = [t for _, t in read_rows(demo_root / "trainset_label.txt")]
    assert targets != sorted(targets) and targets != sorted(targets, reverse=True)


def test_same_seed_identical_different_seed_differs(demo_root, tmp_path):
    again = build_demo(tmp_path / "again", seed=0, **SMALL)
    assert all_files(again) == all_files(demo_root)
    other = build_demo(tmp_path / "other", seed=1, **SMALL)
    assert all_files(other).keys() != all_files(demo_root).keys()


def test_rebuild_in_place_and_refuses_foreign_files(tmp_path):
    root = build_demo(tmp_path / "d", seed=0, n_train=4, n_val=2, n_test=2, size=40)
    build_demo(root, seed=3, n_train=2, n_val=2, n_test=2, size=40)  # replaces its own files
    assert len(list((root / "trainset").iterdir())) == 2
    (root / "trainset" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine.txt"):
        build_demo(root, seed=0, n_train=2, n_val=2, n_test=2, size=40)


def test_add_editing_fakes(demo_root, tmp_path):
    source = tmp_path / "source"  # a copy with one broken real added
    shutil.copytree(demo_root, source)
    (source / "trainset" / "broken.jpg").write_bytes(b"not a jpeg")
    with open(source / "trainset_label.txt", "a") as labels:
        labels.write("broken.jpg,0\n")
    out = tmp_path / "with_fakes"
    summary = add_editing_fakes(source, out, split="trainset", per_real=2, seed=0,
                            ops=["self_blend", "splice", "inpaint"])

    original = read_rows(source / "trainset_label.txt")
    n_reals = sum(1 for _, t in original if t == 0) - 1  # the broken one makes no fakes
    rows = read_rows(out / "trainset_label.txt")
    assert rows[: len(original)] == original
    fakes = rows[len(original):]
    assert len(fakes) == 2 * n_reals == summary["fakes"]
    assert summary["broken"] == 1 and summary["reals"] == n_reals
    assert set(summary["ops"]) <= {"self_blend", "splice", "inpaint"}
    assert all(target == 1 for _, target in fakes)
    for name, _ in rows:
        assert (out / "trainset" / name).is_file()
    first = original[0][0]
    assert os.path.samefile(out / "trainset" / first, source / "trainset" / first)  # hard link
    for name, _ in fakes:
        mask = np.asarray(Image.open(out / "trainset_masks" / name.replace(".jpg", ".png")))
        assert mask.shape == (SMALL["size"], SMALL["size"]) and mask.max() > 0
    for split in ("valset", "testset"):  # the other splits are carried over unchanged
        assert (out / f"{split}_label.txt").read_bytes() == (demo_root / f"{split}_label.txt").read_bytes()
        assert all_files(out / split) == all_files(demo_root / split)

    again = add_editing_fakes(demo_root, tmp_path / "again", split="trainset", per_real=1, seed=0)
    repeat = add_editing_fakes(demo_root, tmp_path / "repeat", split="trainset", per_real=1, seed=0)
    assert again["ops"] == repeat["ops"]
    assert all_files(tmp_path / "again") == all_files(tmp_path / "repeat")
    with pytest.raises(FileExistsError, match="already exists"):
        add_editing_fakes(demo_root, tmp_path / "again", split="trainset")


def test_make_fakes_rejects_bad_ops(demo_root, tmp_path):
    with pytest.raises(KeyError, match="valid names"):
        add_editing_fakes(demo_root, tmp_path / "x", ops=["no_such_op"])


def test_demo_command_line(tmp_path, capsys):
    assert demo_main([str(tmp_path / "cli"), "--n-train", "2", "--n-val", "2", "--n-test", "2",
                      "--size", "32"]) == 0
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary and "trainset 2" in summary
    assert demo_main([str(tmp_path / "bad"), "--size", "8"]) == 2
