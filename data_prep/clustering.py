"""k-means on embeddings: the clustering behind the leave-one-cluster-out re-split.

A random validation split shares identities, cameras and generators with the training
split, so its score flatters the model. The winning-solution recipe instead:

1. embed every training image (trainset + valset together; the re-split replaces the
   given split) with a backbone on its face crop (`python -m experts.cluster_split`, which
   builds the models),
2. cluster the embeddings with k-means into k groups (this module: numbers in, cluster ids
   out, no model),
3. fold k validates on cluster k and trains on the other clusters (`data_prep.folds`).
"""
from __future__ import annotations

import warnings

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

# k-means settings. torch_kmeans' defaults (8 random inits, 100 iterations, full width)
# take ~40 s for 4000 x 512 on one CPU core, because every iteration materialises
# inits x n x k x d distances. Unit-length vectors reduced to 64 principal components,
# 3 k-means++ inits and at most 50 iterations take well under a second.
PCA_DIMS = 64
KMEANS_INITS = 3
KMEANS_MAX_ITER = 50
KMEANS_TOL = 1e-4  # mean centre shift (in unit-sphere units) below which an init has converged


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
