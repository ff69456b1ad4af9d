"""Data root readers: competition and folder layouts, hold-out split, named layout errors."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.dataset import (
    DataLayoutError,
    Sample,
    holdout_split,
    list_images,
    load_splits,
    read_unlabelled,
    summarize,
)
from data_prep.labels import append_label_rows, label_path, read_label_file, write_label_file


def write_image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(path)
    return path


def write_split(root, split, rows, header="img_name,target", images=None):
    """rows: [(name, target)]; images: names to create (default: every row's name)."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(images if images is not None else [r[0] for r in rows]):
        write_image(folder / name, i)
    lines = [header] + [f"{n},{t}" for n, t in rows]
    (root / f"{split}_label.txt").write_text("\n".join(lines) + "\n")
    return folder


def balanced_rows(n, prefix="img"):
    return [(f"{prefix}{i:03d}.png", i % 2) for i in range(n)]


@pytest.fixture
def competition(tmp_path):
    # Names written in a shuffled order: the reader must sort them.
    train = balanced_rows(10, "t")
    write_split(tmp_path, "trainset", train[::-1])
    write_split(tmp_path, "valset", balanced_rows(6, "v"))
    for i in range(3):
        write_image(tmp_path / "testset" / f"z{i}.png", i)
    (tmp_path / "testset_label.txt").write_text("img_name,target\nz0.png,1\nz1.png,0\nz2.png,1\n")
    return tmp_path


# ---------------------------------------------------------------- competition layout

def test_competition_layout(competition):
    splits = load_splits(competition)
    assert set(splits) == {"trainset", "valset", "testset"}
    train = splits["trainset"]
    assert [s.name for s in train] == sorted(f"t{i:03d}.png" for i in range(10))
    assert all(isinstance(s, Sample) for s in train)
    assert {s.name: s.target for s in train} == dict(balanced_rows(10, "t"))
    assert all(s.path == competition / "trainset" / s.name for s in train)
    assert [s.name for s in splits["valset"]] == [f"v{i:03d}.png" for i in range(6)]
    assert [s.target for s in splits["valset"]] == [0, 1, 0, 1, 0, 1]


def test_testset_is_unlabelled_and_labels_read_separately(competition):
    test = load_splits(competition)["testset"]
    assert [s.name for s in test] == ["z0.png", "z1.png", "z2.png"]
    assert all(s.target is None for s in test)
    assert read_label_file(label_path(competition, "testset")) == {"z0.png": 1, "z1.png": 0, "z2.png": 1}


def test_no_testset(competition, tmp_path):
    import shutil
    shutil.rmtree(competition / "testset")
    (competition / "testset_label.txt").unlink()
    assert load_splits(competition)["testset"] == []


def test_label_file_extras_are_tolerated(tmp_path):
    folder = tmp_path / "trainset"
    for name in ("a.png", "b.png"):
        write_image(folder / name)
    # BOM, CRLF, spaces around fields, blank lines, an extra column
    (tmp_path / "trainset_label.txt").write_bytes(
        "\ufeffimg_name, target\r\na.png , 1\r\n\r\nb.png,0,extra\r\n".encode("utf-8"))
    assert read_label_file(tmp_path / "trainset_label.txt") == {"a.png": 1, "b.png": 0}


def test_label_file_written_is_read_back_the_same(tmp_path):
    """The one owner of the format (data_prep.labels): written, appended to, read back."""
    path = label_path(tmp_path, "trainset")
    write_label_file(path, [("a.png", 0), ("with,comma.png", 1)])
    assert path.read_text().splitlines() == ["img_name,target", "a.png,0", '"with,comma.png",1']
    labelled = set(read_label_file(path))
    assert append_label_rows(path, ["b.png", "a.png"], 1, labelled) == 1  # a.png is there already
    path.write_text(path.read_text().rstrip("\n"))  # a hand-edited file without its last newline
    assert append_label_rows(path, ["c.png"], 0, labelled) == 1
    assert read_label_file(path) == {"a.png": 0, "with,comma.png": 1, "b.png": 1, "c.png": 0}
    fresh = tmp_path / "new_label.txt"
    assert append_label_rows(fresh, ["x.png"], 1, set()) == 1 and read_label_file(fresh) == {"x.png": 1}


def test_missing_valset_gives_stratified_holdout(tmp_path):
    write_split(tmp_path, "trainset", [(f"r{i:02d}.png", 0) for i in range(20)] +
                [(f"f{i:02d}.png", 1) for i in range(40)])
    splits = load_splits(tmp_path, seed=3)
    train, val = splits["trainset"], splits["valset"]
    assert summarize(val) == {"n": 9, "n_fake": 6, "n_real": 3}  # 15 % of each class
    assert summarize(train) == {"n": 51, "n_fake": 34, "n_real": 17}
    assert not {s.name for s in train} & {s.name for s in val}
    assert [s.name for s in val] == sorted(s.name for s in val)
    again = load_splits(tmp_path, seed=3)
    assert again["valset"] == val and again["trainset"] == train
    others = {tuple(s.name for s in load_splits(tmp_path, seed=s)["valset"]) for s in range(4, 10)}
    assert len(others | {tuple(s.name for s in val)}) > 1  # the seed matters


# ---------------------------------------------------------------- folder layout

@pytest.fixture
def folders(tmp_path):
    for i in range(20):
        write_image(tmp_path / "real" / f"real_{i:02d}.png", i)
        write_image(tmp_path / "fake" / f"fake_{i:02d}.jpg", i)
    (tmp_path / "real" / "notes.txt").write_text("not an image")
    (tmp_path / "fake" / "Thumbs.db").write_bytes(b"\0\1")
    (tmp_path / "fake" / "sub.png").mkdir()  # a folder with an image-like name
    return tmp_path


def test_folder_layout_holdout(folders):
    splits = load_splits(folders, seed=0)
    train, val = splits["trainset"], splits["valset"]
    everything = train + val
    assert len(everything) == 40
    assert all(s.path.suffix in (".png", ".jpg") and s.path.is_file() for s in everything)
    assert all(s.target == (1 if s.name.startswith("fake") else 0) for s in everything)
    assert summarize(val) == {"n": 6, "n_fake": 3, "n_real": 3}
    assert summarize(train) == {"n": 34, "n_fake": 17, "n_real": 17}
    assert not {s.name for s in train} & {s.name for s in val}
    assert splits["testset"] == []
    assert load_splits(folders, seed=0) == splits  # deterministic


def test_holdout_split_directly():
    samples = [Sample(Path(f"{i:03d}.png"), int(i < 30)) for i in range(100)]
    train, val = holdout_split(samples, 0.2, seed=1)
    assert summarize(val) == {"n": 20, "n_fake": 6, "n_real": 14}
    assert len(train) + len(val) == 100
    assert holdout_split(samples, 0.2, seed=1) == (train, val)
    assert holdout_split(samples, 0.2, seed=2) != (train, val)


def test_list_images_ignores_other_files(tmp_path):
    write_image(tmp_path / "b.PNG")
    write_image(tmp_path / "a.jpg")
    (tmp_path / "c.txt").write_text("x")
    (tmp_path / "d.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [s.name for s in read_unlabelled(tmp_path)] == ["a.jpg", "b.PNG"]


def test_non_images_in_competition_folder_ignored(tmp_path):
    folder = write_split(tmp_path, "trainset", balanced_rows(8))
    (folder / "README.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(b"\0")
    write_split(tmp_path, "valset", balanced_rows(4, "v"))
    assert len(load_splits(tmp_path)["trainset"]) == 8


# ---------------------------------------------------------------- layout errors

def expect_layout_error(root, *fragments):
    with pytest.raises(DataLayoutError) as err:
        load_splits(root)
    message = str(err.value)
    for fragment in fragments:
        assert str(fragment) in message, message
    assert "\n" not in message
    return message


def test_missing_label_file(tmp_path):
    write_image(tmp_path / "trainset" / "a.png")
    expect_layout_error(tmp_path, tmp_path / "trainset_label.txt", "missing label file")


def test_missing_image_folder(tmp_path):
    (tmp_path / "trainset_label.txt").write_text("img_name,target\na.png,1\n")
    expect_layout_error(tmp_path, tmp_path / "trainset", "missing image folder")


@pytest.mark.parametrize("header", ["name,target", "img_name,label", "a.png,1", ""])
def test_wrong_header(tmp_path, header):
    write_split(tmp_path, "trainset", balanced_rows(4), header=header)
    expect_layout_error(tmp_path, tmp_path / "trainset_label.txt", "header")


def test_label_row_without_image(tmp_path):
    rows = balanced_rows(4)
    write_split(tmp_path, "trainset", rows + [("ghost.png", 1)], images=[r[0] for r in rows])
    expect_layout_error(tmp_path, tmp_path / "trainset_label.txt", "ghost.png")


def test_image_without_label_row(tmp_path):
    rows = balanced_rows(4)
    write_split(tmp_path, "trainset", rows, images=[r[0] for r in rows] + ["stray.png"])
    expect_layout_error(tmp_path, tmp_path / "trainset", "stray.png", "trainset_label.txt")


@pytest.mark.parametrize("bad", ["2", "x", "-1", "0.5", ""])
def test_bad_target_value(tmp_path, bad):
    rows = balanced_rows(4)
    write_split(tmp_path, "trainset", rows[:3] + [(rows[3][0], bad)])
    message = expect_layout_error(tmp_path, f"{tmp_path / 'trainset_label.txt'}:5", rows[3][0])
    assert "0 or 1" in message


def test_short_row(tmp_path):
    write_split(tmp_path, "trainset", balanced_rows(4))
    with open(tmp_path / "trainset_label.txt", "a") as f:
        f.write("lonely.png\n")
    expect_layout_error(tmp_path, f"{tmp_path / 'trainset_label.txt'}:6")


def test_duplicate_row(tmp_path):
    rows = balanced_rows(4)
    write_split(tmp_path, "trainset", rows + [rows[1]])
    expect_layout_error(tmp_path, f"{tmp_path / 'trainset_label.txt'}:6", rows[1][0], "twice")


def test_errors_in_valset_name_the_valset_file(tmp_path):
    write_split(tmp_path, "trainset", balanced_rows(4))
    write_split(tmp_path, "valset", [("v.png", 7), ("w.png", 0)])
    expect_layout_error(tmp_path, tmp_path / "valset_label.txt")


def test_single_class_split(tmp_path):
    write_split(tmp_path, "trainset", [(f"{i}.png", 1) for i in range(4)])
    write_split(tmp_path, "valset", balanced_rows(4, "v"))
    expect_layout_error(tmp_path, "trainset", "both")


def test_unknown_layout_and_missing_root(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    expect_layout_error(tmp_path, "trainset/", "real/")
    expect_layout_error(tmp_path / "nowhere", "not a directory")
    (tmp_path / "real").mkdir()  # real/ without fake/
    expect_layout_error(tmp_path, "real/ + fake/")
