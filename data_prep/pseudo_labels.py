"""Unsupervised real / fake labels from embeddings: 2-means, then a rule names the fake cluster.

    labels, info = pseudo_labels(embeddings, seed=0)     # info["rule"], info["fake_score"], ...

`python -m experts.cluster_split --unsupervised` writes them for a data root.
"""
from __future__ import annotations

import numpy as np
import torch

from data_prep.clustering import clustering_features, run_kmeans

RULE_REAL_ANCHORS = "real_anchors"
RULE_ANOMALY_SCORE = "anomaly_score"
RULE_SPREAD = "spread"
RULE_TEXT = {  # how `pseudo_labels` decides which of its two clusters is fake
    RULE_REAL_ANCHORS: "the cluster holding the larger share of known-real anchor images is real",
    RULE_ANOMALY_SCORE: "the cluster with the higher mean anomaly score is fake",
    RULE_SPREAD: "the cluster whose points are farther from its centroid on average is fake",
}


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
