"""k-fold stacking: the meta-learner learns from scores the experts gave images they never saw.

With `ensemble.oof_folds=K` (K >= 2), `python -m ensemble.fit` first trains every expert K
more times, through the one trainer (`experts.train.train_experts`), and then fits the
stacker on out-of-fold scores of all of trainset+valset instead of the valset hold-out:

    folds        trainset+valset dealt into K folds (`outer_folds`): the clusters of a folds.csv
                 of experts.cluster_split (`ensemble.oof_folds_csv`, leave-one-cluster-out), else
                 stratified random folds, seeded, in which near duplicates (a real and its fakes,
                 neighbouring frames of one video: perceptual hashes within
                 `ensemble.oof_group_distance` bits, as data_prep.audit finds them) share a fold
    fold j       its experts (<name>_fold<j>) train on the other folds, choose their epoch (and the
                 DAE its calibration) on an inner slice of those, never on fold j, and score fold j
    the stacker  is fitted on the K blocks of scores; at test time it combines the experts trained
                 on all the data (train.sh's step 2), as with the hold-out

So the stacker sees every image once, each scored by experts that never trained on it: K + 1
trainings of every expert in all. Everything goes under `<run_dir>/oof/`:

    folds.csv                  img_name,target,fold: the folds (clusters.json / .md: their sizes)
    fold<j>/folds.csv          what fold j's trainer read (data.folds_csv): fold j = its inner
                               validation slice, -2 = the images it scores (never trained on)
    fold<j>/weights/, runs/    its experts, as experts.train writes them

`out_of_fold_rows` reads these back for `ensemble.fit`. What each fold's experts trained on is
taken from the folds file their own manifest records, and compared by content (sha256) with
the images they score, so a changed folds file or a copy across folds stops the fit.
"""
from __future__ import annotations

import copy
import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import ConfigError, DataLayoutError
from configs import Config, without_removed
from data_prep.audit import fingerprint, near_duplicate_pairs
from data_prep.dataset import Sample
from data_prep.folds import FOLDS_HEADER, UNCLUSTERED, read_folds, write_folds
from experts.train import HELD_OUT_FOLD, train_experts
from experts.weights import MANIFEST, WeightsError, read_manifest, sha256_file

log = logging.getLogger("ensemble.oof")

# Fold j's experts choose their epoch on 1 / 7 of their training folds: about the share of
# the usual valset hold-out (15 %).
INNER_VALIDATION_SPLITS = 7


@dataclass
class StackingRows:
    """Images the stacker is fitted on and the experts that score them, which never trained on them."""
    name: str                  # how messages name the rows: "valset", "fold-2"
    weights: Path              # the experts' weights folder
    experts: list[str]         # their names there, in the order of the config's experts
    samples: list[Sample]      # the images they score
    trained: dict[str, str]    # content id -> which image it is, of every image these experts trained on
    where: str                 # the file or folder a leakage message names
    remedy: str                # what to do when a scored image is among `trained`


def content_id(path) -> str | None:
    """sha256 of a file's bytes; None when it cannot be read (nothing trained or scored on it)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def oof_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "oof"


def fold_dir(cfg: Config, fold: int) -> Path:
    return oof_dir(cfg) / f"fold{fold}"


def check_oof_config(cfg: Config) -> int:
    """The number of folds, K; ConfigError when it cannot be a k-fold split."""
    k = cfg.ensemble.oof_folds
    if k == 1 or k < 0:
        raise ConfigError(f"ensemble.oof_folds must be 0 (valset hold-out) or at least 2, got {k}")
    return k


# ----------------------------------------------------------------------------- the folds

def near_duplicate_groups(samples: list[Sample], max_distance: int) -> np.ndarray:
    """A group id per sample: connected components of the pairs whose 64-bit perceptual hashes
    (data_prep.audit) are at most `max_distance` bits apart (exact copies are at 0). An image
    that cannot be decoded, or max_distance < 0, is a group of its own."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if max_distance < 0:
        return np.arange(len(samples))
    prints = [fingerprint("pool", s.path, s.target) for s in samples]
    hashed = [i for i, p in enumerate(prints) if p.phash is not None]
    pairs = near_duplicate_pairs(np.array([prints[i].phash for i in hashed], dtype=np.uint64), max_distance)
    rows = [hashed[i] for i, _, _ in pairs]
    cols = [hashed[j] for _, j, _ in pairs]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(samples), len(samples)))
    return connected_components(graph, directed=False)[1]


def _seed(*parts: int) -> int:
    """A 32-bit seed for scikit-learn from several integers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def grouped_folds(targets: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold id in 0..k-1 per row: stratified by target, every group in one fold (rows are
    taken in the order given: pass them sorted by name for a result independent of input order)."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(groups)) < k:
        raise DataLayoutError(f"{len(targets)} images in {len(np.unique(groups))} groups of near duplicates "
                              f"cannot be dealt into {k} folds; lower the folds or ensemble.oof_group_distance")
    folds = np.empty(len(targets), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=_seed(seed))
    for fold, (_, members) in enumerate(splitter.split(np.zeros(len(targets)), targets, groups)):
        folds[members] = fold
    return folds


def outer_folds(cfg: Config, pool: list[Sample], groups: np.ndarray) -> dict[str, int]:
    """img_name -> fold of every trainset+valset image (`pool`, sorted by name; `groups`: its
    near-duplicate groups), from ensemble.oof_folds_csv or dealt at random (grouped,
    stratified, seeded); written to <run_dir>/oof/folds.csv."""
    k = check_oof_config(cfg)
    names, targets = [s.name for s in pool], np.array([s.target for s in pool])
    if cfg.ensemble.oof_folds_csv:
        source = cfg.ensemble.oof_folds_csv
        given = read_folds(source)
        missing = [n for n in names if n not in given]
        if missing:
            raise DataLayoutError(f"{source}: no fold for {len(missing)} of {len(names)} images, e.g. "
                                  f"{missing[:3]}; were the folds made for other data?")
        folds = np.array([given[n] for n in names])
        found = sorted({int(f) for f in folds if f != UNCLUSTERED})
        if found != list(range(k)):
            raise ConfigError(f"{source}: folds {found}, but ensemble.oof_folds={k} (folds 0..{k - 1})")
        method = f"{source} ({k} folds)"
    else:
        folds = grouped_folds(targets, groups, k, cfg.seed)
        method = (f"stratified random ({k} folds, seed {cfg.seed}, near duplicates within "
                  f"{cfg.ensemble.oof_group_distance} bits in one fold)")
    write_folds(oof_dir(cfg), names, targets, folds, method=method)
    return dict(zip(names, folds.tolist()))


def fold_training_assignment(pool: list[Sample], groups: np.ndarray, outer: dict[str, int], fold: int,
                             seed: int) -> dict[str, int]:
    """img_name -> fold, what fold `fold`'s trainer reads: the images it scores HELD_OUT_FOLD,
    an inner validation slice of the other folds (stratified, near duplicates kept together)
    `fold`, every other image its own fold (trained on)."""
    others = [i for i, s in enumerate(pool) if outer[s.name] not in (fold, UNCLUSTERED)]
    inner = grouped_folds(np.array([pool[i].target for i in others]), groups[others],
                          INNER_VALIDATION_SPLITS, _seed(seed, fold))
    assignment = {s.name: HELD_OUT_FOLD if outer[s.name] == fold else outer[s.name] for s in pool}
    assignment.update({pool[i].name: fold for i, slice_ in zip(others, inner) if slice_ == 0})
    return assignment


def write_fold_training_file(path: Path, pool: list[Sample], assignment: dict[str, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(FOLDS_HEADER)
        writer.writerows([s.name, s.target, assignment[s.name]] for s in pool)
    return path


# ----------------------------------------------------------------------------- training

def train_fold_experts(cfg: Config, pool: list[Sample]) -> None:
    """Deal trainset+valset (`pool`) into the folds and train every expert of the config once
    per fold, each without the fold it will score (K more trainings of every expert)."""
    k = check_oof_config(cfg)
    pool = sorted(pool, key=lambda s: s.name)
    groups = near_duplicate_groups(pool, cfg.ensemble.oof_group_distance)
    sizes = np.bincount(groups)
    log.info("%d images in %d groups of near duplicates (largest: %d)", len(pool), len(sizes), sizes.max())
    outer = outer_folds(cfg, pool, groups)
    for fold in range(k):
        assignment = fold_training_assignment(pool, groups, outer, fold, cfg.seed)
        fold_cfg = copy.deepcopy(cfg)
        fold_cfg.data.folds_csv = str(write_fold_training_file(fold_dir(cfg, fold) / "folds.csv", pool, assignment))
        fold_cfg.data.fold = fold
        fold_cfg.out, fold_cfg.run_dir = str(fold_dir(cfg, fold) / "weights"), str(fold_dir(cfg, fold) / "runs")
        log.info("fold %d/%d: training %s without its %d images", fold + 1, k, cfg.experts,
                 sum(f == HELD_OUT_FOLD for f in assignment.values()))
        train_experts(fold_cfg)


# ----------------------------------------------------------------------------- fitting

def out_of_fold_rows(cfg: Config, pool: list[Sample], ids: dict[str, str | None]) -> list[StackingRows]:
    """For each fold: its images and the experts that score them, with what those trained on
    (read from the folds file their manifest records). `pool`: trainset+valset; `ids`: their
    content ids by name."""
    k = check_oof_config(cfg)
    folds_csv = oof_dir(cfg) / "folds.csv"
    retrain = "train the fold experts again (python -m ensemble.fit without --reuse-fold-experts)"
    if not folds_csv.is_file():
        raise DataLayoutError(f"{folds_csv}: missing: ensemble.oof_folds={k} needs the fold experts; {retrain}")
    outer = read_folds(folds_csv)
    missing = [s.name for s in pool if s.name not in outer]
    if missing:
        raise DataLayoutError(f"{folds_csv}: no fold for {len(missing)} images, e.g. {missing[:3]}: the data "
                              f"changed since the fold experts were trained; {retrain}")
    found = sorted({f for f in outer.values() if f != UNCLUSTERED})
    if found != list(range(k)):
        raise ConfigError(f"{folds_csv}: the fold experts were trained on folds {found}, but "
                          f"ensemble.oof_folds={k}; {retrain}")
    rows = []
    for fold in range(k):
        weights = fold_dir(cfg, fold) / "weights"
        recorded = without_removed(read_manifest(weights).get("config", {}).get("data", {}), "data.",
                                   str(weights / MANIFEST))  # trained with removed options: an error
        if recorded.get("fold") != fold or not recorded.get("folds_csv"):
            raise WeightsError(f"{weights}: its experts were not trained as fold {fold} (data.fold, "
                               f"data.folds_csv); {retrain}")
        assignment = read_folds(recorded["folds_csv"])
        trained = {ids[s.name]: f"{s.name} (fold {fold}'s experts trained on it)" for s in pool
                   if assignment.get(s.name, HELD_OUT_FOLD) != HELD_OUT_FOLD and ids[s.name]}
        rows.append(StackingRows(
            name=f"fold-{fold}", weights=weights, experts=[f"{n}_fold{fold}" for n in cfg.experts],
            samples=[s for s in pool if outer[s.name] == fold], trained=trained, where=str(folds_csv),
            remedy=f"Was {folds_csv} changed after the fold experts were trained, or is an image a copy of "
                   f"one in another fold (python -m data_prep.audit lists copies)? Then {retrain}"))
    return rows
