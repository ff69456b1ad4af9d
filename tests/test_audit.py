"""Leakage and duplicate audit (data_prep.audit) and the stacker's content-hash guard."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from skimage import data as photos

from configs import load_config
from data_prep import audit
from data_prep.dataset import Sample
from ensemble import fit as ensemble_fit
from ensemble.stacking import LeakageError
from experts import create_expert
from experts.weights import save_expert
from helpers import tiny_overrides


def photo_crops() -> dict[str, np.ndarray]:
    """96 x 96 crops of different photographs: distinct images that look like images."""
    return {
        "astronaut": photos.astronaut()[40:136, 180:276],
        "coffee": photos.coffee()[100:196, 200:296],
        "chelsea": photos.chelsea()[60:156, 120:216],
        "rocket": photos.rocket()[150:246, 220:316],
        "camera": np.repeat(photos.camera()[100:196, 200:296, None], 3, axis=2),
        "coins": np.repeat(photos.coins()[40:136, 100:196, None], 3, axis=2),
    }


def write_labels(path, rows):
    path.write_text("img_name,target\n" + "".join(f"{name},{target}\n" for name, target in rows))


@pytest.fixture
def leaky_root(tmp_path):
    """A competition layout with one of each finding planted, and one same-name trap."""
    crops, root = photo_crops(), tmp_path / "data"
    for split in ("trainset", "valset", "testset"):
        (root / split).mkdir(parents=True)
    train, val, test = root / "trainset", root / "valset", root / "testset"
    Image.fromarray(crops["astronaut"]).save(train / "a.png")
    Image.fromarray(crops["coffee"]).save(train / "b.png")
    Image.fromarray(crops["chelsea"]).save(train / "c.jpg", quality=95)
    Image.fromarray(crops["rocket"]).save(train / "d.png")
    Image.fromarray(crops["camera"]).save(train / "shared.png")
    write_labels(root / "trainset_label.txt", [("a.png", 0), ("b.png", 1), ("c.jpg", 0), ("d.png", 1),
                                               ("shared.png", 0)])
    Image.fromarray(crops["coins"]).save(val / "shared.png")  # same name, other content: no finding
    shutil.copyfile(train / "b.png", val / "copy_of_b.png")  # byte-identical copy, new name
    Image.fromarray(crops["astronaut"]).save(val / "resaved_a.bmp")  # same pixels, other bytes, other label
    brighter = ImageEnhance.Brightness(Image.open(train / "c.jpg")).enhance(1.05)
    brighter.save(val / "near_c.jpg", quality=70)  # re-encoded and brightened: a near duplicate
    write_labels(root / "valset_label.txt", [("shared.png", 0), ("copy_of_b.png", 1), ("resaved_a.bmp", 1),
                                             ("near_c.jpg", 0)])
    shutil.copyfile(train / "d.png", test / "t.png")  # trainset -> testset leak (testset unlabelled)
    (test / "broken.jpg").write_bytes((train / "c.jpg").read_bytes()[:300])  # truncated
    return root


def test_audit_finds_each_planted_duplicate_and_nothing_else(leaky_root):
    result = audit.audit(leaky_root)
    assert result["images"] == {"trainset": 5, "valset": 4, "testset": 2}

    groups = {frozenset(g["files"]): g for g in result["exact_duplicates"]["groups"]}
    assert set(groups) == {frozenset({"trainset/b.png", "valset/copy_of_b.png"}),
                           frozenset({"trainset/a.png", "valset/resaved_a.bmp"}),
                           frozenset({"trainset/d.png", "testset/t.png"})}
    assert groups[frozenset({"trainset/b.png", "valset/copy_of_b.png"})]["same_bytes"]
    assert not groups[frozenset({"trainset/a.png", "valset/resaved_a.bmp"})]["same_bytes"]
    assert result["exact_duplicates"]["pairs"] == {"trainset~valset": 2, "trainset~testset": 1}

    near = result["near_duplicates"]
    assert [(p["a"], p["b"]) for p in near["list"]] == [("trainset/c.jpg", "valset/near_c.jpg")]
    assert near["pairs"] == {"trainset~valset": 1} and near["labelled_differently"] == 0

    assert result["label_conflicts"] == [["trainset/a.png (0)", "valset/resaved_a.bmp (1)"]]
    assert len(result["unreadable"]) == 1 and "broken.jpg" in result["unreadable"][0]
    everything = json.dumps(result)
    assert "shared.png" not in everything  # one name in two splits is not a duplicate


def test_distinct_photos_are_far_apart_and_a_recompressed_copy_is_close():
    crops = photo_crops()
    hashes = {name: audit.perceptual_hash(rgb) for name, rgb in crops.items()}
    names = sorted(hashes)
    closest = min(bin(hashes[a] ^ hashes[b]).count("1") for i, a in enumerate(names) for b in names[i + 1:])
    assert closest > 3 * audit.DEFAULT_MAX_DISTANCE
    small = np.asarray(Image.fromarray(crops["coffee"]).resize((80, 80)).resize((96, 96)))
    assert bin(audit.perceptual_hash(small) ^ hashes["coffee"]).count("1") <= audit.DEFAULT_MAX_DISTANCE


def test_near_duplicate_pairs_equal_brute_force_across_blocks():
    """3000 hashes: the search runs in several blocks of rows; planted pairs at distance 1-3."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=3000, dtype=np.uint64)
    for k in range(30):
        flips = np.uint64(sum(1 << int(b) for b in rng.choice(64, size=k % 3 + 1, replace=False)))
        hashes[2000 + k] = hashes[k * 50] ^ flips
    found = audit.near_duplicate_pairs(hashes, 4)
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(distance <= 4, k=1))
    assert sorted(found) == sorted(zip(i.tolist(), j.tolist(), distance[i, j].tolist()))
    assert len(found) >= 30


def test_folders_layout_reports_a_label_conflict(tmp_path):
    rgb = photo_crops()["rocket"]
    for folder in ("real", "fake"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rgb).save(tmp_path / folder / f"{folder}.png")
    result = audit.audit(tmp_path)
    assert result["images"] == {"real+fake": 2}
    assert result["label_conflicts"] == [["real+fake/real.png (0)", "real+fake/fake.png (1)"]]


def test_command_line_report_and_json(leaky_root, tmp_path, capsys):
    assert audit.main([str(leaky_root), "--json", str(tmp_path / "out" / "audit.json")]) == 0
    report = capsys.readouterr().out
    assert "3 group(s), 2 of them byte-identical" in report
    assert "trainset/c.jpg ~ valset/near_c.jpg" in report
    assert "label conflicts (same pixels labelled real and fake): 1" in report
    assert report.rstrip().splitlines()[-1].startswith("warning: duplicates across splits")
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert saved["exact_duplicates"]["pairs"] == {"trainset~valset": 2, "trainset~testset": 1}


def test_command_line_bad_root_is_one_line(tmp_path, capsys):
    assert audit.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: data root is not a directory" in err
    (tmp_path / "trainset").mkdir()
    (tmp_path / "trainset_label.txt").write_text("name,label\n")
    assert audit.main([str(tmp_path)]) == 2
    assert "first line must be the header" in capsys.readouterr().err


# ---------------------------------------------------------------- the stacker's guard

def test_guard_compares_content_not_names(leaky_root):
    trained = {ensemble_fit.content_id(p): f"trainset/{p.name}" for p in (leaky_root / "trainset").iterdir()}
    same_name = [Sample(leaky_root / "valset" / "shared.png", 0)]
    assert ensemble_fit.check_no_trainset_copies(same_name, trained, leaky_root) == \
        [ensemble_fit.content_id(leaky_root / "valset" / "shared.png")]
    copied = same_name + [Sample(leaky_root / "valset" / "copy_of_b.png", 1)]
    with pytest.raises(LeakageError, match=r"1 valset image\(s\).*copy_of_b.png = trainset/b.png"):
        ensemble_fit.check_no_trainset_copies(copied, trained, leaky_root)


@pytest.fixture
def untrained_weights(tmp_path):
    """A tiny convnext expert saved untrained: enough for ensemble.fit to score with."""
    overrides = tiny_overrides(tmp_path, experts="convnext") + ["ensemble.editing_fakes=0",
                                                                 "ensemble.method=logreg"]
    cfg = load_config("cpu", overrides)
    save_expert(create_expert(cfg.expert_config("convnext"), 64), cfg.out, "convnext", cfg.face, {})
    return overrides


def relabel(root, split, rename=None, add=None):
    """Rename an image of a split (and its label row), or add (name, target) rows."""
    label_file = root / f"{split}_label.txt"
    rows = [line.split(",") for line in label_file.read_text().splitlines()[1:]]
    if rename:
        old, new = rename
        (root / split / old).rename(root / split / new)
        rows = [[new if name == old else name, target] for name, target in rows]
    write_labels(label_file, rows + list(add or []))


def test_fit_accepts_a_shared_name_and_refuses_a_renamed_copy(demo_root, tmp_path, untrained_weights, capsys):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    train_name = sorted(p.name for p in (root / "trainset").iterdir())[0]
    val_name = sorted(p.name for p in (root / "valset").iterdir())[0]
    relabel(root, "valset", rename=(val_name, train_name))  # other content under a trainset name
    assert ensemble_fit.main([str(root)] + untrained_weights) == 0

    target = {n: t for n, t in (line.split(",") for line in
                                (root / "trainset_label.txt").read_text().splitlines()[1:])}[train_name]
    shutil.copyfile(root / "trainset" / train_name, root / "valset" / "renamed_copy.png")
    relabel(root, "valset", add=[("renamed_copy.png", target)])
    with pytest.raises(LeakageError, match=f"renamed_copy.png = trainset/{train_name}"):
        ensemble_fit.fit_ensemble(load_config("cpu", untrained_weights + [f"data_root={root}"]))
    capsys.readouterr()
    assert ensemble_fit.main([str(root)] + untrained_weights) == 2  # the command line: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "renamed_copy.png" in err


def test_fit_with_a_single_fake_left_in_valset_is_one_line(demo_root, tmp_path, untrained_weights, capsys):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    rows = [line.split(",") for line in (root / "valset_label.txt").read_text().splitlines()[1:]]
    fakes = [name for name, target in rows if target.strip() == "1"]
    for name in fakes[1:]:
        (root / "valset" / name).unlink()
    write_labels(root / "valset_label.txt", [r for r in rows if r[0] not in fakes[1:]])
    overrides = [o for o in untrained_weights if not o.startswith("ensemble.editing_fakes")]
    assert ensemble_fit.main([str(root), *overrides, "ensemble.editing_fakes=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 fake(s); it needs at least 2 of each" in err


# ---------------------------------------------------------------- train.sh

@pytest.mark.parametrize("audit_can_read", [True, False], ids=["findings", "unreadable_root"])
def test_train_sh_audits_then_trains_whatever_the_audit_says(leaky_root, tmp_path, audit_can_read):
    """The audit runs right after the data step and never stops the recipe: the training step
    comes next either way (here it stops at once, on an unknown expert name)."""
    if not audit_can_read:
        (leaky_root / "trainset_label.txt").write_text("name,label\n")
    script = Path(__file__).resolve().parent.parent / "train.sh"
    done = subprocess.run(["bash", str(script), str(leaky_root), "experts=no_such_expert",
                           f"out={tmp_path / 'weights'}", f"reports={tmp_path / 'reports'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0  # the training step's own error
    out = done.stdout
    assert out.index("== auditing") < out.index("== training experts")
    if audit_can_read:
        assert out.index("label conflicts (same pixels labelled real and fake): 1") < out.index("== training")
        saved = json.loads((tmp_path / "reports" / "audit.json").read_text())
        assert saved["label_conflicts"] == [["trainset/a.png (0)", "valset/resaved_a.bmp (1)"]]
    else:
        assert "first line must be the header" in done.stderr
        assert "warning: the data audit could not run (above); training goes on" in done.stderr
