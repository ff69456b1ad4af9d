"""Folds of the leave-one-cluster-out re-split, and the folds file training reads back.

Fold k validates on cluster k (`data_prep.clustering`) and trains on all the other images:

    write_folds("reports/folds", names, targets, clusters)          # folds.csv, clusters.json / .md
    train_samples, val_samples = fold_samples(samples, "reports/folds/folds.csv", k=0)

`random_folds` deals stratified random folds instead: the baseline the clusters are compared to.
"""
from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from common.errors import ConfigError, DataLayoutError, UsageError
from data_prep.dataset import Sample
from data_prep.labels import read_csv_rows

UNCLUSTERED = -1  # fold of an image that could not be read: trained on in every fold, never validated

FOLDS_HEADER = ["img_name", "target", "fold"]


def _check_columns(names, targets, groups) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = [str(n) for n in names]
    targets, groups = np.asarray(targets), np.asarray(groups)
    if not len(names) == len(targets) == len(groups):
        raise ValueError(f"got {len(names)} names, {len(targets)} targets and {len(groups)} cluster ids")
    check_unique_names(names)
    return names, targets, groups


def check_unique_names(names: list[str]):
    """Folds are keyed by file name, so two images with one name (e.g. the same name in
    trainset/ and valset/) cannot be told apart."""
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DataLayoutError(f"image names must be unique (folds are keyed by name); "
                         f"{len(repeated)} repeated, e.g. {repeated[:5]}")


def make_folds(names, targets, clusters) -> list[dict]:
    """One fold per cluster: fold k validates on cluster k and trains on all other images.

    Returns [{'fold': k, 'train': [names], 'val': [names]}, ...] in cluster order. Images
    with cluster UNCLUSTERED (-1) are in every fold's train list. A validation cluster
    holding only one class gets a warning: AUC is undefined on it.
    """
    names, targets, clusters = _check_columns(names, targets, clusters)
    folds = []
    for k in sorted(int(c) for c in np.unique(clusters) if c != UNCLUSTERED):
        in_val = clusters == k
        val = [name for name, v in zip(names, in_val) if v]
        train = [name for name, v in zip(names, in_val) if not v]
        assert not set(train) & set(val), f"fold {k}: an image is in both train and val"
        val_classes = set(targets[in_val].tolist())
        if len(val_classes) < 2:
            warnings.warn(f"fold {k}: the validation cluster holds only target {val_classes} "
                          f"({len(val)} images); AUC is undefined on it", stacklevel=2)
        folds.append({"fold": k, "train": train, "val": val})
    return folds


def random_folds(names, targets, k: int, seed: int) -> np.ndarray:
    """Stratified random fold ids (n,) in 0..k-1: the baseline the cluster split is compared to.

    Each class is shuffled and dealt round-robin, so every fold gets the same share of
    fakes. Rows are first put in name order, so the result does not depend on input order.
    """
    names, targets, _ = _check_columns(names, targets, np.zeros(len(targets)))
    if k < 2:
        raise UsageError(f"k must be at least 2, got {k}")
    rng = np.random.default_rng(seed)
    by_name = np.argsort(names, kind="stable")
    dealing_order = []
    for target in np.unique(targets):
        rows = by_name[targets[by_name] == target]
        dealing_order.extend(rows[rng.permutation(len(rows))])
    folds = np.empty(len(names), dtype=np.int64)
    folds[np.asarray(dealing_order, dtype=np.int64)] = np.arange(len(names)) % k
    return folds


def cluster_table(targets, clusters) -> list[dict]:
    """Per cluster: size, n_real, n_fake, fake_fraction (targets 1 = fake, 0 = real)."""
    targets, clusters = np.asarray(targets), np.asarray(clusters)
    rows = []
    for cluster in sorted(int(c) for c in np.unique(clusters)):
        members = targets[clusters == cluster]
        n_fake = int((members == 1).sum())
        rows.append({"cluster": cluster, "size": len(members), "n_real": len(members) - n_fake,
                     "n_fake": n_fake, "fake_fraction": round(n_fake / len(members), 4)})
    return rows


def write_folds(out_dir, names, targets, clusters, method: str = "kmeans") -> Path:
    """Write out_dir/folds.csv (img_name,target,fold) plus clusters.json and clusters.md
    describing each cluster; `method` names how the groups were made in the reports.
    Returns the path of folds.csv."""
    names, targets, clusters = _check_columns(names, targets, clusters)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folds_path = out_dir / "folds.csv"
    with open(folds_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(FOLDS_HEADER)
        writer.writerows([name, int(t), int(c)] for name, t, c in zip(names, targets, clusters))

    table = cluster_table(targets, clusters)
    report = {"method": method, "n_images": len(names), "unclustered_fold": UNCLUSTERED, "clusters": table}
    (out_dir / "clusters.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "clusters.md").write_text(clusters_markdown(table, method), encoding="utf-8")
    return folds_path


def clusters_markdown(table: list[dict], method: str) -> str:
    lines = [f"# Folds by {method}", "",
             "Fold k validates on cluster k and trains on the others"
             + (f"; cluster {UNCLUSTERED} = unreadable images, train only." if any(
                 r["cluster"] == UNCLUSTERED for r in table) else "."),
             "", "| cluster | size | n_real | n_fake | fake fraction |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['cluster']} | {r['size']} | {r['n_real']} | {r['n_fake']} | {r['fake_fraction']:.3f} |"
              for r in table]
    return "\n".join(lines) + "\n"


def read_folds(path) -> dict[str, int]:
    """img_name -> fold from a folds.csv written by `write_folds`; errors name file and line."""
    path = Path(path)
    folds: dict[str, int] = {}
    for line_no, row in enumerate(read_csv_rows(path, tuple(FOLDS_HEADER), "folds file not found"), start=2):
        if not "".join(row).strip():
            continue
        if len(row) < 3:
            raise DataLayoutError(f"{path}:{line_no}: expected 'img_name,target,fold', got {row!r}")
        name, fold = row[0].strip(), row[2].strip()
        if name in folds:
            raise DataLayoutError(f"{path}:{line_no}: {name!r} is listed twice")
        try:
            folds[name] = int(fold)
        except ValueError:
            raise DataLayoutError(f"{path}:{line_no}: fold of {name!r} must be an integer, got {fold!r}") from None
    return folds


def fold_samples(samples: list[Sample], folds: dict[str, int] | str | Path, k: int
                 ) -> tuple[list[Sample], list[Sample]]:
    """(train, val) samples of fold k. `folds` is a name -> fold dict or a folds.csv path.

    Every sample must have a fold entry: folds made for other data would silently train on
    validation images otherwise.
    """
    source = "the folds table"
    if isinstance(folds, (str, Path)):
        source, folds = str(folds), read_folds(folds)
    missing = [s for s in samples if s.name not in folds]
    if missing:
        raise DataLayoutError(
            f"{source}: no fold for {len(missing)} of {len(samples)} images, e.g. "
            f"{[str(s.path) for s in missing[:3]]}; were the folds made for other data? "
            f"Re-run python -m experts.cluster_split on this data root.")
    known = sorted({f for f in folds.values() if f != UNCLUSTERED})
    if k not in known:
        raise ConfigError(f"{source}: no fold {k} (data.fold); folds are {known}")
    train = [s for s in samples if folds[s.name] != k]
    val = [s for s in samples if folds[s.name] == k]
    return train, val
