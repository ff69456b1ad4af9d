"""Leave-one-cluster-out re-split: a validation set that is out of distribution.

A random validation split shares identities, cameras and generators with the training
split, so its score flatters the model. The winning-solution recipe instead:

1. embed every training image (trainset + valset together; the re-split replaces the
   given split) with a backbone on its face crop,
2. cluster the embeddings with k-means into k groups,
3. fold k validates on cluster k and trains on the other clusters.

This module holds steps 2 and 3 and the folds file, on embeddings that are given (numbers in,
folds out: no model is built here), plus `pseudo_labels`, which splits unlabelled embeddings
into real and fake. The command that embeds the face crops with a backbone or a trained
expert and writes the folds is `python -m experts.cluster_split` (it builds models, so it
lives with the experts). Training reads the folds back:

    train_samples, val_samples = fold_samples(samples, "reports/folds/folds.csv", k=0)
"""
from __future__ import annotations

import csv
import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    # torch_kmeans decorates helpers with torch.jit.script, which torch 2.x deprecates:
    # the warning is about the library, not about anything a user of this module can fix.
    warnings.simplefilter("ignore", FutureWarning)
    from torch_kmeans import KMeans

from common.errors import UsageError
from common.runtime import select_device
from configs import ConfigError
from data_prep.dataset import DataLayoutError, Sample

# k-means settings. torch_kmeans' defaults (8 random inits, 100 iterations, full width)
# take ~40 s for 4000 x 512 on one CPU core, because every iteration materialises
# inits x n x k x d distances. Unit-length vectors reduced to 64 principal components,
# 3 k-means++ inits and at most 50 iterations take well under a second.
PCA_DIMS = 64
KMEANS_INITS = 3
KMEANS_MAX_ITER = 50
KMEANS_TOL = 1e-4  # mean centre shift (in unit-sphere units) below which an init has converged

UNCLUSTERED = -1  # fold of an image that could not be read: trained on in every fold, never validated

FOLDS_HEADER = ["img_name", "target", "fold"]

RULE_REAL_ANCHORS = "real_anchors"
RULE_ANOMALY_SCORE = "anomaly_score"
RULE_SPREAD = "spread"
RULE_TEXT = {  # how `pseudo_labels` decides which of its two clusters is fake
    RULE_REAL_ANCHORS: "the cluster holding the larger share of known-real anchor images is real",
    RULE_ANOMALY_SCORE: "the cluster with the higher mean anomaly score is fake",
    RULE_SPREAD: "the cluster whose points are farther from its centroid on average is fake",
}


# ================================================================ clustering

def clustering_features(emb: np.ndarray, device: str = "auto") -> torch.Tensor:
    """Embeddings -> the float32 space k-means runs in: unit length, then at most PCA_DIMS
    principal components.

    Unit length makes k-means compare feature directions, as cosine similarity does,
    instead of letting a few large-norm vectors pull the centres. The PCA is exact
    (eigenvectors of the covariance), so it needs no random seed, and cuts the cost of every
    k-means iteration by d / PCA_DIMS.
    """
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) == 0:
        raise ValueError(f"embeddings must be a non-empty (n, d) array, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or infinite values")
    x = F.normalize(torch.from_numpy(emb).to(select_device(device)), dim=1)
    if x.shape[1] > PCA_DIMS:
        centred = x - x.mean(dim=0)
        covariance = centred.T @ centred / len(x)
        _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        x = centred @ eigenvectors[:, -PCA_DIMS:].flip(1)
    return x.contiguous()


def run_kmeans(features: torch.Tensor, k: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """torch_kmeans on (n, d) features -> (cluster id per row, (k, d) centres), ids as the
    library numbers them. The library seeds its own generator, so the global RNG is untouched."""
    n = len(features)
    if not 2 <= k < n:
        raise UsageError(f"k must be at least 2 and smaller than the number of points ({n}), got {k}")
    model = KMeans(init_method="k-means++", num_init=min(KMEANS_INITS, n - 1), max_iter=KMEANS_MAX_ITER,
                   tol=KMEANS_TOL, seed=seed, verbose=False)
    result = model(features[None], k=k)  # the library clusters a batch: (1, n, d)
    return result.labels[0].cpu().numpy(), result.centers[0]


def relabel_by_size(clusters: np.ndarray) -> np.ndarray:
    """Renumber cluster ids 0 = largest, 1 = next...; equal sizes are ordered by their first
    member, so the ids do not depend on the arbitrary numbering k-means ends with."""
    ids, first_member, sizes = np.unique(clusters, return_index=True, return_counts=True)
    order = np.lexsort((first_member, -sizes))  # last key sorts first
    new_id = {int(ids[i]): rank for rank, i in enumerate(order)}
    return np.array([new_id[int(c)] for c in clusters], dtype=np.int64)


def kmeans(emb: np.ndarray, k: int, seed: int = 0, device: str = "auto") -> np.ndarray:
    """Cluster ids (n,) of embeddings (n, d), 0 = the largest cluster.

    Deterministic for a seed on CPU (on a GPU, float summation order can differ between runs).
    """
    clusters, _ = run_kmeans(clustering_features(emb, device), k, seed)
    clusters = relabel_by_size(clusters)
    n_found = len(np.unique(clusters))
    if n_found < k:
        warnings.warn(f"k-means found only {n_found} non-empty clusters of the {k} asked for", stacklevel=2)
    return clusters


# ================================================================ folds

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
    if not path.is_file():
        raise DataLayoutError(f"{path}: folds file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:3]] != FOLDS_HEADER:
        raise DataLayoutError(f"{path}: first line must be the header '{','.join(FOLDS_HEADER)}'")
    folds: dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
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


# ================================================================ pseudo labels

def pseudo_labels(emb: np.ndarray, seed: int = 0, anomaly_scores=None, real_anchor_mask=None
                  ) -> tuple[np.ndarray, dict]:
    """Unsupervised labels (n,), 1 = fake, 0 = real: 2-means on the embeddings, then one rule
    decides which of the two clusters is fake. The first rule whose inputs are given and
    that is not a tie decides:

    1. 'real_anchors': `real_anchor_mask` (bool, n) marks a few images known to be real;
       the cluster holding the larger share of them is real.
    2. 'anomaly_score': `anomaly_scores` (n,), higher = more anomalous (e.g. the DAE
       expert's score); the cluster with the higher mean score is fake.
    3. 'spread': the cluster whose points lie farther from its centroid on average is
       fake, since manipulations add variance that real photographs do not have.

    info holds 'rule' (the name above), 'rule_text', 'n_fake', 'n_real', the evidence of
    each rule for the 'fake' and 'real' cluster ('spread', and 'anchors' / 'mean_anomaly'
    when given), and 'fake_score' (n,): distance to the real centroid minus distance to
    the fake centroid, a continuous score (higher = more fake) for ROC AUC.
    """
    features = clustering_features(emb)
    n = len(features)
    clusters, centres = run_kmeans(features, 2, seed)
    distances = torch.cdist(features, centres).cpu().numpy()  # (n, 2)
    spread = [float(distances[clusters == c, c].mean()) if (clusters == c).any() else 0.0 for c in (0, 1)]

    evidence: dict[str, list[float]] = {"spread": spread}
    rule, fake_cluster = None, None
    if real_anchor_mask is not None:
        anchors = np.asarray(real_anchor_mask, dtype=bool)
        _check_length(anchors, n, "real_anchor_mask")
        if not anchors.any():
            raise ValueError("real_anchor_mask marks no image")
        evidence["anchors"] = [int(anchors[clusters == c].sum()) for c in (0, 1)]
        if evidence["anchors"][0] != evidence["anchors"][1]:
            rule, fake_cluster = RULE_REAL_ANCHORS, int(np.argmin(evidence["anchors"]))
    if anomaly_scores is not None:
        scores = np.asarray(anomaly_scores, dtype=np.float64)
        _check_length(scores, n, "anomaly_scores")
        if not np.isfinite(scores).all():
            raise ValueError("anomaly_scores contain NaN or infinite values")
        evidence["mean_anomaly"] = [float(scores[clusters == c].mean()) if (clusters == c).any() else -np.inf
                                    for c in (0, 1)]
        if rule is None and evidence["mean_anomaly"][0] != evidence["mean_anomaly"][1]:
            rule, fake_cluster = RULE_ANOMALY_SCORE, int(np.argmax(evidence["mean_anomaly"]))
    if rule is None:
        rule, fake_cluster = RULE_SPREAD, int(np.argmax(spread))

    real_cluster = 1 - fake_cluster
    labels = (clusters == fake_cluster).astype(np.int64)
    info = {
        "rule": rule,
        "rule_text": RULE_TEXT[rule],
        "n_fake": int(labels.sum()),
        "n_real": int(n - labels.sum()),
        **{name: {"fake": values[fake_cluster], "real": values[real_cluster]} for name, values in evidence.items()},
        "fake_score": distances[:, real_cluster] - distances[:, fake_cluster],
    }
    return labels, info


def _check_length(values: np.ndarray, n: int, what: str):
    if values.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},) like the embeddings, got {values.shape}")
