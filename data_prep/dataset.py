"""Readers for labelled image folders.

Two layouts are accepted under a data root:

* competition: `trainset/` + `trainset_label.txt` (CSV, header `img_name,target`,
  1 = fake, 0 = real: `data_prep.labels`), the same for `valset`, and an optional unlabelled `testset/`
  (a `testset_label.txt` beside it is read only by evaluation);
* folders: `real/` and `fake/`.

When there is no validation split (folders layout, or no `valset/`), a stratified
15 % of the training images is held out with the config's seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataLayoutError
from data_prep.images import is_image_file
from data_prep.labels import label_path, read_csv_rows, read_label_file

SPLITS = ("trainset", "valset", "testset")


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int | None  # 1 = fake, 0 = real, None = unlabelled

    @property
    def name(self) -> str:
        return self.path.name


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; other files are ignored."""
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and is_image_file(p)),
                  key=lambda p: p.name)


def read_labelled_split(root: Path, split: str) -> list[Sample]:
    folder, label_file = root / split, label_path(root, split)
    if not folder.is_dir():
        raise DataLayoutError(f"{folder}: missing image folder")
    labels = read_label_file(label_file)
    images = {p.name: p for p in list_images(folder)}
    missing = sorted(set(labels) - set(images))
    if missing:
        raise DataLayoutError(f"{label_file}: {len(missing)} labelled image(s) not in {folder}/, "
                              f"e.g. {missing[:3]}")
    unlabelled = sorted(set(images) - set(labels))
    if unlabelled:
        raise DataLayoutError(f"{folder}: {len(unlabelled)} image(s) without a row in {label_file.name}, "
                              f"e.g. {unlabelled[:3]}")
    return [Sample(images[n], labels[n]) for n in sorted(labels)]


def read_methods_file(root: Path, split: str) -> dict[str, str]:
    """img_name -> manipulation method from `<split>_methods.csv` (columns img_name,method;
    method is `real` for the reals), as FaceForensics++-style data sets ship it."""
    path = Path(root) / f"{split}_methods.csv"
    rows = read_csv_rows(path, ("img_name", "method"), "missing; data.methods needs a methods file per split")
    return {row[0].strip(): row[1].strip() for row in rows if len(row) >= 2 and row[0].strip()}


def filter_methods(samples: list[Sample], methods_of: dict[str, str], keep: list[str],
                   where: Path) -> list[Sample]:
    """The samples whose method is in `keep` (reals are method `real`)."""
    unknown = sorted({s.name for s in samples} - set(methods_of))
    if unknown:
        raise DataLayoutError(f"{where}: {len(unknown)} image(s) have no method row, e.g. {unknown[:3]}")
    known = set(methods_of.values())
    if not set(keep) <= known:
        raise DataLayoutError(f"{where}: data.methods names {sorted(set(keep) - known)}, "
                              f"which are not among its methods {sorted(known)}")
    return [s for s in samples if methods_of[s.name] in keep]


def read_unlabelled(folder: Path) -> list[Sample]:
    return [Sample(p, None) for p in list_images(folder)]


def holdout_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified random hold-out: (train, val)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for target in (0, 1):
        group = [s for s in samples if s.target == target]
        order = rng.permutation(len(group))
        n_val = int(round(len(group) * fraction))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    key = lambda s: s.name  # noqa: E731 - stable order, independent of the split draw
    return sorted(train, key=key), sorted(val, key=key)


def load_splits(root, seed: int = 0, val_fraction: float = 0.15, methods: list[str] | None = None,
                allow_real_only: bool = False) -> dict[str, list[Sample]]:
    """{'trainset': [...], 'valset': [...], 'testset': [...] (may be empty)}; targets of the
    testset are None here: evaluation reads them (`read_labelled_split(root, 'testset')`).
    `methods` (e.g. ['real', 'Deepfakes']) keeps only those manipulation methods in trainset
    and valset, read from `<split>_methods.csv`: the leave-one-method-out protocols.
    `allow_real_only`: trainset and valset may hold reals only (training makes its fakes by
    editing them: the self-blended-images protocol)."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"{root}: data root is not a directory")
    if (root / "trainset").is_dir() or label_path(root, "trainset").exists():
        train = read_labelled_split(root, "trainset")
        if methods:
            train = filter_methods(train, read_methods_file(root, "trainset"), methods, root / "trainset")
        if (root / "valset").is_dir():
            val = read_labelled_split(root, "valset")
            if methods:
                val = filter_methods(val, read_methods_file(root, "valset"), methods, root / "valset")
        else:
            train, val = holdout_split(train, val_fraction, seed)
    elif methods:
        raise DataLayoutError(f"{root}: data.methods needs the competition layout with <split>_methods.csv")
    elif (root / "real").is_dir() and (root / "fake").is_dir():
        pool = [Sample(p, 0) for p in list_images(root / "real")] + \
               [Sample(p, 1) for p in list_images(root / "fake")]
        train, val = holdout_split(pool, val_fraction, seed)
    else:
        raise DataLayoutError(f"{root}: expected trainset/ + trainset_label.txt, or real/ + fake/")
    for split, samples in (("trainset", train), ("valset", val)):
        classes = {s.target for s in samples}
        if classes != {0, 1} and not (allow_real_only and classes == {0}):
            raise DataLayoutError(f"{root}: {split} needs both real (0) and fake (1) images, has {sorted(classes)}")
    test = read_unlabelled(root / "testset") if (root / "testset").is_dir() else []
    return {"trainset": train, "valset": val, "testset": test}


def summarize(samples: list[Sample]) -> dict:
    n_fake = sum(1 for s in samples if s.target == 1)
    return {"n": len(samples), "n_fake": n_fake, "n_real": len(samples) - n_fake}
