"""Evaluation metrics for deepfake detectors.

Conventions used everywhere in this module:
  * ``y`` holds labels, 1 = fake, 0 = real.
  * ``p`` holds scores, higher = more likely fake. Ranking metrics (AUC, AP,
    EER, TPR@FPR, threshold choice) accept any real-valued score; metrics that
    treat the score as a probability (ECE, Brier, accuracy at 0.5) require
    ``p`` in [0, 1].
  * A sample is called fake when ``p >= threshold``.

Degenerate input:
  * NaN/inf scores, non-binary labels, empty or mismatched arrays -> ValueError
    from every function.
  * Only one class present -> the ranking metrics (roc_auc, average_precision,
    eer, tpr_at_fpr, choose_threshold) raise ValueError, because they are
    undefined. ``evaluate_scores`` catches that case and reports NaN for those
    keys, so that evaluating e.g. an all-fake subset still yields accuracy,
    ECE and Brier.
"""

import math

import numpy as np
from sklearn import metrics as skm

# Columns shown by markdown_table when the caller does not choose.
DEFAULT_TABLE_COLUMNS = [
    "auc", "ap", "eer", "acc", "threshold", "tpr@fpr1", "tpr@fpr5",
    "ece", "brier", "n", "n_fake",
]


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------

def _as_labels_and_scores(y, p):
    """Return (y, p) as 1-D int / float arrays, or raise ValueError."""
    y = np.asarray(y).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p have different lengths: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        raise ValueError("empty input: no samples to evaluate")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"scores contain {np.sum(~np.isfinite(p))} NaN/inf values")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError(f"labels must be 0 (real) or 1 (fake), got values {np.unique(y)[:10]}")
    return y.astype(int), p


def _require_both_classes(y):
    n_fake = int(y.sum())
    if n_fake == 0 or n_fake == y.size:
        raise ValueError(
            f"only one class present ({n_fake} fake of {y.size}); "
            "ranking metrics (AUC, AP, EER, TPR@FPR) are undefined"
        )


def _require_probabilities(p):
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"scores must be probabilities in [0, 1], got range [{p.min()}, {p.max()}]")


def _full_roc(y, p):
    """ROC curve with every vertex kept (fpr, tpr ascending; thresholds descending).

    sklearn's first threshold is +inf (nothing called fake, point (0, 0)).
    """
    return skm.roc_curve(y, p, drop_intermediate=False)


# --------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------

def roc_auc(y, p):
    """Area under the ROC curve (ValueError if only one class)."""
    y, p = _as_labels_and_scores(y, p)
    _require_both_classes(y)
    return float(skm.roc_auc_score(y, p))


def safe_auc(y, p) -> float:
    """`roc_auc`, or NaN where a split holds one class only (a validation curve goes on)."""
    try:
        return roc_auc(y, p)
    except ValueError:
        return float("nan")


def average_precision(y, p):
    """Average precision with fake as the positive class (ValueError if only one class)."""
    y, p = _as_labels_and_scores(y, p)
    _require_both_classes(y)
    return float(skm.average_precision_score(y, p))


def eer(y, p):
    """Equal error rate and the threshold where it happens.

    Walks the ROC curve until the false-negative rate (1 - TPR) drops to or
    below the false-positive rate, then interpolates linearly between the two
    surrounding vertices to the point where FPR == FNR. The threshold is
    interpolated the same way (when the earlier vertex is sklearn's +inf
    "call nothing fake" point, the later vertex's threshold is used).

    Returns (eer, threshold). Perfect separation gives (0.0, lowest fake score).
    """
    y, p = _as_labels_and_scores(y, p)
    _require_both_classes(y)
    fpr, tpr, thresholds = _full_roc(y, p)
    gap = (1.0 - tpr) - fpr  # FNR - FPR: starts at 1, ends at -1, never increases
    i = int(np.argmax(gap <= 0))  # first vertex at or past the crossing
    if gap[i] == 0:
        return float(fpr[i]), float(thresholds[i])

    # Crossing lies strictly between vertex i-1 (gap > 0) and vertex i (gap < 0).
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    rate = fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
    if np.isinf(thresholds[i - 1]):
        threshold = thresholds[i]
    else:
        threshold = thresholds[i - 1] + t * (thresholds[i] - thresholds[i - 1])
    return float(rate), float(threshold)


def tpr_at_fpr(y, p, fpr):
    """True-positive rate at a false-positive-rate budget.

    Rule: the ROC curve is taken as the piecewise-linear curve through all
    its vertices (a point on a segment is reachable by randomly mixing the two
    neighbouring thresholds). The answer is the largest TPR on that curve
    whose FPR is <= ``fpr``: the last vertex with FPR <= target, extended
    linearly along the next segment up to FPR == target.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"target fpr must be in [0, 1], got {fpr}")
    y, p = _as_labels_and_scores(y, p)
    _require_both_classes(y)
    fprs, tprs, _ = _full_roc(y, p)
    k = int(np.searchsorted(fprs, fpr, side="right")) - 1  # last vertex within budget
    if k == len(fprs) - 1 or fprs[k] == fpr:
        return float(tprs[k])
    step = (fpr - fprs[k]) / (fprs[k + 1] - fprs[k])
    return float(tprs[k] + step * (tprs[k + 1] - tprs[k]))


def choose_threshold(y, p):
    """Decision threshold maximising Youden's J (= TPR - FPR) on validation data.

    Maximising J is the same as maximising balanced accuracy, since
    balanced accuracy = (TPR + 1 - FPR) / 2 = (J + 1) / 2. Ties go to the
    higher threshold (fewer fakes called). The returned value is the midpoint
    between the winning ROC threshold and the next lower distinct score, so
    the validation decisions are unchanged but there is a margin on both
    sides for unseen data.
    """
    y, p = _as_labels_and_scores(y, p)
    _require_both_classes(y)
    fpr, tpr, thresholds = _full_roc(y, p)
    # Skip vertex 0 (threshold +inf, J = 0): the last vertex (everything
    # called fake) also has J = 0, so a real threshold always ties or wins.
    best = 1 + int(np.argmax((tpr - fpr)[1:]))
    if best == len(thresholds) - 1:
        return float(thresholds[best])  # everything called fake: no lower score
    return float((thresholds[best] + thresholds[best + 1]) / 2.0)


# --------------------------------------------------------------------------
# Probability / decision metrics
# --------------------------------------------------------------------------

def expected_calibration_error(y, p, n_bins=15):
    """Expected calibration error of p read as P(fake).

    Equal-width bins [k/n, (k+1)/n) on [0, 1] (the last bin includes 1.0).
    In each non-empty bin: conf = mean p, acc = fraction of fakes.
    ECE = sum over bins of (bin size / n) * |acc - conf|.
    """
    y, p = _as_labels_and_scores(y, p)
    _require_probabilities(p)
    bin_of = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in np.unique(bin_of):
        in_bin = bin_of == b
        ece += in_bin.mean() * abs(y[in_bin].mean() - p[in_bin].mean())
    return float(ece)


def brier(y, p):
    """Mean squared error between p (as P(fake)) and the 0/1 label."""
    y, p = _as_labels_and_scores(y, p)
    _require_probabilities(p)
    return float(np.mean((p - y) ** 2))


def accuracy_at(y, p, threshold):
    """Fraction correct when calling a sample fake iff p >= threshold."""
    y, p = _as_labels_and_scores(y, p)
    return float(np.mean((p >= threshold).astype(int) == y))


def rank_against(reference, values):
    """Mid-rank of each value among the reference scores (ties count half), divided by their
    number: in [0, 1], and a single value is ranked on its own, whatever else is scored with it."""
    reference = np.sort(np.asarray(reference, dtype=float))
    below = np.searchsorted(reference, values, side="left")
    below_or_equal = np.searchsorted(reference, values, side="right")
    return (below + below_or_equal) / (2.0 * len(reference))


# --------------------------------------------------------------------------
# Summary and reporting
# --------------------------------------------------------------------------

def _ranking_metrics(y, p):
    """AUC-like metrics, NaN when only one class is present."""
    if y.min() == y.max():
        return {"auc": math.nan, "ap": math.nan, "eer": math.nan,
                "tpr@fpr1": math.nan, "tpr@fpr5": math.nan}
    return {
        "auc": roc_auc(y, p),
        "ap": average_precision(y, p),
        "eer": eer(y, p)[0],
        "tpr@fpr1": tpr_at_fpr(y, p, 0.01),
        "tpr@fpr5": tpr_at_fpr(y, p, 0.05),
    }


def evaluate_scores(y, p, threshold=None):
    """All standard metrics in one dict.

    ``acc`` is measured at ``threshold`` (0.5 when not given); the threshold
    used is reported under ``threshold``. AUC-like keys are NaN when only one
    class is present (see module docstring); other bad input raises ValueError.
    """
    y, p = _as_labels_and_scores(y, p)
    threshold = 0.5 if threshold is None else float(threshold)
    result = _ranking_metrics(y, p)
    result.update({
        "acc": accuracy_at(y, p, threshold),
        "threshold": threshold,
        "ece": expected_calibration_error(y, p),
        "brier": brier(y, p),
        "n": int(y.size),
        "n_fake": int(y.sum()),
    })
    ordered = ["auc", "ap", "eer", "acc", "threshold", "tpr@fpr1", "tpr@fpr5",
               "ece", "brier", "n", "n_fake"]
    return {key: result[key] for key in ordered}


def _format_cell(value):
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows, columns=None):
    """Markdown table with one row per name in ``rows`` (name -> metrics dict).

    ``columns`` defaults to the standard metric keys that appear in at least
    one row, followed by any other keys in first-seen order. Floats are shown
    with 4 decimals; missing values as empty cells.
    """
    if columns is None:
        seen = [key for row in rows.values() for key in row]
        extra = [key for key in dict.fromkeys(seen) if key not in DEFAULT_TABLE_COLUMNS]
        columns = [key for key in DEFAULT_TABLE_COLUMNS if key in seen] + extra
    lines = [
        "| name | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        cells = [_format_cell(row.get(column)) for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
