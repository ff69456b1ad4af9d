"""Leave-one-cluster-out re-split: a validation set that is out of distribution.

A random validation split shares identities, cameras and generators with the training
split, so its score flatters the model. The winning-solution recipe instead:

1. embed every training image (trainset + valset together; the re-split replaces the
   given split) with a backbone on its face crop,
2. cluster the embeddings with k-means into k groups,
3. fold k validates on cluster k and trains on the other clusters.

Outputs of the command line (OUT = --out):

    folds.csv        img_name,target,fold   (fold -1 = unreadable image: train only)
    clusters.json    size, n_real, n_fake, fake fraction of every cluster
    clusters.md      the same as a Markdown table
    tsne_cluster.png t-SNE of the embeddings coloured by cluster
    tsne_label.png   ... coloured by real / fake

`--random` writes stratified random folds instead (the baseline to compare against), and
`--unsupervised` ignores the labels: it splits the embeddings into two clusters, names one
fake by a documented rule (`pseudo_labels`) and writes pseudo_labels.csv.

    python -m data_prep.cluster_split DATA_ROOT --out reports/folds --k 5
    train_samples, val_samples = fold_samples(samples, "reports/folds/folds.csv", k=0)
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

with warnings.catch_warnings():
    # torch_kmeans decorates helpers with torch.jit.script, which torch 2.x deprecates:
    # the warning is about the library, not about anything a user of this module can fix.
    warnings.simplefilter("ignore", FutureWarning)
    from torch_kmeans import KMeans

from configs import ExpertConfig, FaceConfig, load_config
from data_prep.dataset import DataLayoutError, Sample, load_splits
from data_prep.faces import FaceCropCache
from data_prep.images import ImageDecodeError
from data_prep.transforms import resize_square

log = logging.getLogger(__name__)

# k-means settings. torch_kmeans' defaults (8 random inits, 100 iterations, full width)
# take ~40 s for 4000 x 512 on one CPU core, because every iteration materialises
# inits x n x k x d distances. Unit-length vectors reduced to 64 principal components,
# 3 k-means++ inits and at most 50 iterations take well under a second.
PCA_DIMS = 64
KMEANS_INITS = 3
KMEANS_MAX_ITER = 50
KMEANS_TOL = 1e-4  # mean centre shift (in unit-sphere units) below which an init has converged

UNCLUSTERED = -1  # fold of an image that could not be read: trained on in every fold, never validated
TSNE_MAX_POINTS = 3000  # t-SNE is quadratic-ish; a seeded subsample shows the same structure

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

def resolve_device(device: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    return torch.device(device)


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
    x = F.normalize(torch.from_numpy(emb).to(resolve_device(device)), dim=1)
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
        raise ValueError(f"k must be at least 2 and smaller than the number of points ({n}), got {k}")
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
        raise ValueError(f"image names must be unique (folds are keyed by name); "
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
        raise ValueError(f"k must be at least 2, got {k}")
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
            f"Re-run python -m data_prep.cluster_split on this data root.")
    known = sorted({f for f in folds.values() if f != UNCLUSTERED})
    if k not in known:
        raise ValueError(f"{source}: no fold {k}; folds are {known}")
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


# ================================================================ embedding

def embed_with_backbone(samples: list[Sample], model_name: str, face_cfg: FaceConfig, cache_dir,
                        image_size: int = 128, batch_size: int = 64, pretrained: bool = False,
                        device: str = "cpu",
                        embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n_kept, D) float32, kept_indices (n_kept,)) of the samples' face crops.

    Crops come from FaceCropCache and are resized to image_size the way evaluation does.
    Images that cannot be decoded are skipped with a one-line warning each; kept_indices
    says which samples the rows belong to.

    By default the features are those of timm `model_name` (num_classes=0, pooled), fed
    with the model's own pretrained_cfg mean/std. `embed_fn`, when given, replaces the
    backbone: it takes a float batch (B, 3, H, W) in [0, 1] on `device` and returns (B, D)
    features (e.g. a trained expert's `embed`, which normalises by itself).
    """
    torch_device = resolve_device(device)
    if embed_fn is None:
        embed_fn = timm_embedder(model_name, pretrained, torch_device)
    crops = FaceCropCache(face_cfg, cache_dir)

    features, kept, batch, batch_indices = [], [], [], []

    def flush():
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(torch_device).float() / 255.0
        with torch.no_grad():
            out = embed_fn(x)
        features.append(out.float().reshape(len(batch), -1).cpu().numpy())
        kept.extend(batch_indices)
        batch.clear()
        batch_indices.clear()

    with logging_redirect_tqdm():  # warnings print above the progress bar, not through it
        for index, sample in enumerate(tqdm(samples, desc="embedding", unit="img", leave=False)):
            try:
                crop = crops.load(sample.path)
            except ImageDecodeError as err:
                log.warning("skipped %s", err)
                continue
            batch.append(resize_square(crop, image_size))
            batch_indices.append(index)
            if len(batch) == batch_size:
                flush()
    if batch:
        flush()
    if not features:
        raise ValueError(f"none of the {len(samples)} images could be read")
    if len(kept) < len(samples):
        log.warning("%d of %d images could not be read and were skipped", len(samples) - len(kept), len(samples))
    return np.concatenate(features), np.asarray(kept, dtype=np.int64)


def timm_embedder(model_name: str, pretrained: bool, device: torch.device) -> Callable:
    """A [0, 1] batch -> pooled timm features, normalised with the model's own mean/std."""
    from experts.base import create_backbone  # the project's one way to build a backbone

    backbone = create_backbone(ExpertConfig(model=model_name, pretrained=pretrained)).to(device).eval()
    data_cfg = backbone.pretrained_cfg or {}
    mean = torch.tensor(data_cfg.get("mean", (0.485, 0.456, 0.406)), device=device).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg.get("std", (0.229, 0.224, 0.225)), device=device).view(1, 3, 1, 1)
    return lambda x: backbone((x - mean) / std)


# ================================================================ command line

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.cluster_split",
                                     description="Re-split train+val by embedding clusters "
                                                 "(leave one cluster out).")
    parser.add_argument("data_root", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--k", type=int, default=5, help="number of clusters = folds")
    parser.add_argument("--backbone", default="resnet18", help="timm model that embeds the face crops")
    parser.add_argument("--pretrained", action="store_true", help="hub weights for the backbone (needs network)")
    parser.add_argument("--expert", help="embed with this trained expert (its face crop and input size) "
                                         "instead of --backbone")
    parser.add_argument("--weights", type=Path, default=Path("weights"), help="where --expert is")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--profile", default="cpu", help="config profile: face crop settings and cache dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--random", action="store_true", help="stratified random folds instead (baseline)")
    mode.add_argument("--unsupervised", action="store_true",
                      help="ignore the labels: 2-means pseudo labels -> pseudo_labels.csv")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        cfg = load_config(args.profile)
        splits = load_splits(args.data_root, args.seed)
        samples = splits["trainset"] + splits["valset"]
        names = [s.name for s in samples]
        targets = np.array([s.target for s in samples])
        check_unique_names(names)  # before the slow embedding, not after it
        if args.random:
            folds_path = write_folds(args.out, names, targets, random_folds(names, targets, args.k, args.seed),
                                     method=f"stratified random ({args.k} folds, seed {args.seed})")
            print((args.out / "clusters.md").read_text())
            print(f"wrote {folds_path}")
            return 0
        face, image_size, embed_fn, source = cfg.face, args.image_size, None, args.backbone
        if args.expert:
            from experts.weights import face_config_of, load_expert
            model, entry = load_expert(args.weights, args.expert, resolve_device(args.device))
            face, image_size, embed_fn = face_config_of(entry), model.image_size, model.embed
            source = f"expert {args.expert!r}"
        emb, kept = embed_with_backbone(samples, args.backbone, face, cfg.data.cache_dir, image_size,
                                        args.batch_size, args.pretrained, args.device, embed_fn=embed_fn)
        if args.unsupervised:
            write_pseudo_labels(args.out, [samples[i] for i in kept], emb, args.seed)
        else:
            write_cluster_split(args.out, samples, emb, kept, args.k, args.seed, args.device,
                                method=f"k-means (k={args.k}) on {source} embeddings")
    except (ValueError, RuntimeError) as err:  # DataLayoutError, ConfigError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def write_cluster_split(out_dir: Path, samples: list[Sample], emb: np.ndarray, kept: np.ndarray, k: int,
                        seed: int, device: str, method: str) -> Path:
    """Cluster the kept samples, write folds (unreadable samples get fold -1) and t-SNE plots."""
    from ensemble.plots import plot_embedding_tsne  # matplotlib is only needed here

    clusters = np.full(len(samples), UNCLUSTERED, dtype=np.int64)
    clusters[kept] = kmeans(emb, k, seed, device)
    names = [s.name for s in samples]
    targets = np.array([s.target for s in samples])
    make_folds(names, targets, clusters)  # warns about single-class validation clusters
    folds_path = write_folds(out_dir, names, targets, clusters, method=method)

    shown = _tsne_subsample(len(kept), seed)
    plot_embedding_tsne(emb[shown], clusters[kept][shown], out_dir / "tsne_cluster.png",
                        f"{method}: clusters", colour_by_name="cluster")
    plot_embedding_tsne(emb[shown], _label_names(targets[kept][shown]), out_dir / "tsne_label.png",
                        f"{method}: labels", colour_by_name="label")
    print((out_dir / "clusters.md").read_text())
    print(f"wrote {folds_path}")
    return folds_path


def write_pseudo_labels(out_dir: Path, samples: list[Sample], emb: np.ndarray, seed: int) -> Path:
    """pseudo_labels.csv (img_name,target) + pseudo_labels.json (rule, evidence, and AUC /
    accuracy against the true labels when every sample has one) + t-SNE plots."""
    from sklearn.metrics import roc_auc_score

    from ensemble.plots import plot_embedding_tsne

    labels, info = pseudo_labels(emb, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "pseudo_labels.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["img_name", "target"])
        writer.writerows([s.name, int(label)] for s, label in zip(samples, labels))

    report = {key: value for key, value in info.items() if key != "fake_score"}
    true = np.array([s.target for s in samples])
    if all(t is not None for t in true) and len(set(true.tolist())) == 2:
        true = true.astype(np.int64)
        report["accuracy"] = round(float((labels == true).mean()), 4)
        report["auc"] = round(float(roc_auc_score(true, info["fake_score"])), 4)
    (out_dir / "pseudo_labels.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    shown = _tsne_subsample(len(samples), seed)
    plot_embedding_tsne(emb[shown], _label_names(labels[shown]), out_dir / "tsne_pseudo_label.png",
                        f"pseudo labels ({info['rule']})", colour_by_name="pseudo label")
    if "auc" in report:
        plot_embedding_tsne(emb[shown], _label_names(true[shown]), out_dir / "tsne_label.png",
                            "true labels", colour_by_name="label")
    print(json.dumps(report, indent=2))
    print(f"wrote {csv_path}")
    return csv_path


def _tsne_subsample(n: int, seed: int) -> np.ndarray:
    if n <= TSNE_MAX_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, TSNE_MAX_POINTS, replace=False))


def _label_names(targets) -> np.ndarray:
    return np.where(np.asarray(targets) == 1, "fake", "real")


if __name__ == "__main__":
    sys.exit(main())
