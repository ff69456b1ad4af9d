import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

from common import metrics


def random_scores(seed, n=200):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    return y, p


# -- agreement with scikit-learn ---------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_sklearn_on_random_data(seed):
    y, p = random_scores(seed)
    assert metrics.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert metrics.average_precision(y, p) == pytest.approx(average_precision_score(y, p))
    assert metrics.brier(y, p) == pytest.approx(brier_score_loss(y, p))


# -- EER -----------------------------------------------------------------------

def test_eer_perfect_separation_is_zero():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    rate, threshold = metrics.eer(y, p)
    assert rate == 0.0
    assert threshold == pytest.approx(0.7)  # lowest fake score


def test_eer_exact_quarter_at_a_roc_vertex():
    # Threshold 0.6: one of four reals (0.7) called fake, one of four fakes (0.4) missed.
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.7, 0.6, 0.8, 0.9, 0.4]
    rate, threshold = metrics.eer(y, p)
    assert rate == pytest.approx(0.25)
    assert threshold == pytest.approx(0.6)


def test_eer_interpolated_along_a_segment():
    # ROC passes (FPR 0, FNR .25) -> (FPR .5, FNR .25); FPR == FNR halfway.
    y = [1, 1, 1, 1, 0, 0]
    p = [0.9, 0.8, 0.7, 0.2, 0.5, 0.4]
    rate, threshold = metrics.eer(y, p)
    assert rate == pytest.approx(0.25)
    assert threshold == pytest.approx(0.6)  # halfway between 0.7 and 0.5


def test_eer_of_reversed_scores_is_one():
    rate, _ = metrics.eer([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1])
    assert rate == pytest.approx(1.0)


# -- TPR at FPR ---------------------------------------------------------------

def test_tpr_at_fpr_perfect_separation():
    y = [0] * 50 + [1] * 50
    p = list(np.linspace(0, 0.4, 50)) + list(np.linspace(0.6, 1, 50))
    assert metrics.tpr_at_fpr(y, p, 0.01) == 1.0
    assert metrics.tpr_at_fpr(y, p, 0.0) == 1.0


def test_tpr_at_fpr_five_percent_at_a_vertex():
    # 20 reals at 0.00..0.19; fakes at 0.5, 0.185, 0.05, 0.04.
    # Allowing one false positive (FPR 0.05) catches the fakes at 0.5 and 0.185.
    y = [0] * 20 + [1] * 4
    p = [i / 100 for i in range(20)] + [0.5, 0.185, 0.05, 0.04]
    assert metrics.tpr_at_fpr(y, p, 0.05) == pytest.approx(0.5)
    assert metrics.tpr_at_fpr(y, p, 0.04) == pytest.approx(0.25)  # budget below one real


def test_tpr_at_fpr_interpolates_on_tied_segment():
    # A fake tied with a real at 0.5: the ROC goes straight from (0, .5) to (.1, 1).
    y = [1, 1] + [0] * 10
    p = [0.9, 0.5, 0.5] + [0.1] * 9
    assert metrics.tpr_at_fpr(y, p, 0.05) == pytest.approx(0.75)


# -- threshold choice and accuracy -------------------------------------------

def test_choose_threshold_separates_validation_data():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    threshold = metrics.choose_threshold(y, p)
    assert threshold == pytest.approx(0.5)  # midpoint between 0.3 and 0.7
    assert metrics.accuracy_at(y, p, threshold) == 1.0


def test_choose_threshold_maximises_balanced_accuracy():
    y, p = random_scores(7)
    threshold = metrics.choose_threshold(y, p)

    def balanced_accuracy(t):
        called_fake = np.asarray(p) >= t
        return (called_fake[y == 1].mean() + (~called_fake[y == 0]).mean()) / 2

    best_possible = max(balanced_accuracy(t) for t in np.unique(p))
    assert balanced_accuracy(threshold) == pytest.approx(best_possible)


def test_accuracy_at_uses_greater_or_equal():
    assert metrics.accuracy_at([0, 1, 1], [0.2, 0.5, 0.9], 0.5) == 1.0


# -- calibration ----------------------------------------------------------------

def test_ece_hand_made():
    # Bins [.2,.4): conf .2, acc 0 -> .2 ; [.8,1]: conf .8, acc 1 -> .2 ; ECE = .2
    assert metrics.expected_calibration_error([0, 0, 1, 1], [0.2, 0.2, 0.8, 0.8], n_bins=5) == pytest.approx(0.2)
    # One bin: conf .7, acc .75 -> ECE .05
    assert metrics.expected_calibration_error([1, 1, 1, 0], [0.7] * 4) == pytest.approx(0.05)
    # Perfectly calibrated: score 1.0 falls in the last (closed) bin.
    assert metrics.expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0


def test_ece_and_brier_reject_non_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        metrics.expected_calibration_error([0, 1], [-0.5, 2.0])
    with pytest.raises(ValueError, match="probabilities"):
        metrics.brier([0, 1], [0.1, 1.5])


# -- degenerate input -------------------------------------------------------------

def test_one_class_raises_for_ranking_metrics():
    y, p = [1, 1, 1], [0.2, 0.6, 0.9]
    for metric in (metrics.roc_auc, metrics.average_precision, metrics.eer, metrics.choose_threshold):
        with pytest.raises(ValueError, match="one class"):
            metric(y, p)
    with pytest.raises(ValueError, match="one class"):
        metrics.tpr_at_fpr(y, p, 0.01)


def test_nan_scores_raise():
    with pytest.raises(ValueError, match="NaN"):
        metrics.roc_auc([0, 1], [0.2, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        metrics.evaluate_scores([0, 1], [0.2, float("nan")])


def test_bad_labels_and_lengths_raise():
    with pytest.raises(ValueError, match="labels"):
        metrics.roc_auc([0, 2], [0.1, 0.9])
    with pytest.raises(ValueError, match="lengths"):
        metrics.brier([0, 1, 1], [0.1, 0.9])


# -- summary ------------------------------------------------------------------------

def test_evaluate_scores_keys_and_values():
    y, p = random_scores(3)
    result = metrics.evaluate_scores(y, p)
    assert list(result) == ["auc", "ap", "eer", "acc", "threshold", "tpr@fpr1", "tpr@fpr5",
                            "ece", "brier", "n", "n_fake"]
    assert result["auc"] == pytest.approx(roc_auc_score(y, p))
    assert result["threshold"] == 0.5
    assert result["acc"] == pytest.approx(np.mean((p >= 0.5) == y))
    assert result["n"] == len(y) and result["n_fake"] == int(np.sum(y))
    assert metrics.evaluate_scores(y, p, threshold=0.3)["acc"] == pytest.approx(np.mean((p >= 0.3) == y))


def test_evaluate_scores_one_class_gives_nan_ranking_metrics():
    result = metrics.evaluate_scores([1, 1, 1, 1], [0.9, 0.8, 0.3, 0.7])
    for key in ("auc", "ap", "eer", "tpr@fpr1", "tpr@fpr5"):
        assert math.isnan(result[key])
    assert result["acc"] == pytest.approx(0.75)
    assert result["n_fake"] == 4


def test_markdown_table():
    rows = {
        "expert_a": metrics.evaluate_scores(*random_scores(0)),
        "fusion": {"auc": 0.91234, "n": 10, "note": "best"},
    }
    table = metrics.markdown_table(rows)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| name | auc | ap |")
    assert lines[0].rstrip().endswith("| note |")  # extra keys after the standard ones
    assert len(lines) == 4
    assert "| fusion | 0.9123 |" in table
    assert metrics.markdown_table(rows, columns=["n"]).splitlines()[2] == "| expert_a | 200 |"
