import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from common.metrics import expected_calibration_error
from ensemble.stacking import (
    LeakageError,
    StackingEnsemble,
    assemble_oof_matrix,
    check_out_of_fold,
    platt_scaling,
)

METHODS = ["mean", "rank_mean", "logreg", "lgbm"]


def synthetic_expert_scores(n, seed, n_noise):
    """Column 0 is an informative expert P(fake); the other n_noise columns are uniform noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    informative = 1 / (1 + np.exp(-(6.0 * (y - 0.5) + rng.normal(0, 1, n))))
    X = np.column_stack([informative] + [rng.random(n) for _ in range(n_noise)])
    return X, y


def make_train_test(n_noise):
    X_train, y_train = synthetic_expert_scores(300, seed=0, n_noise=n_noise)
    X_test, y_test = synthetic_expert_scores(200, seed=1, n_noise=n_noise)
    return X_train, y_train, X_test, y_test


@pytest.fixture(scope="module")
def train_test():
    """One informative column and two noise columns."""
    return make_train_test(n_noise=2)


@pytest.fixture(scope="module")
def one_noise_column():
    # The unweighted combiners (mean, rank_mean) give every column equal say,
    # so with two noise columns out of three they cannot reach AUC 0.8.
    return make_train_test(n_noise=1)


# -- fitting and prediction ------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_each_method_beats_chance_on_held_out_data(one_noise_column, method):
    X_train, y_train, X_test, y_test = one_noise_column
    model = StackingEnsemble(method=method).fit(X_train, y_train)
    proba = model.predict_proba(X_test)
    assert proba.shape == (len(X_test), 2)
    assert np.allclose(proba.sum(axis=1), 1.0)
    assert np.all((proba >= 0) & (proba <= 1))
    assert roc_auc_score(y_test, proba[:, 1]) > 0.8
    assert model.method_ == method
    assert list(model.cv_auc_) == [method]


def test_auto_picks_a_method_and_records_cv_auc(train_test):
    X_train, y_train, X_test, y_test = train_test
    model = StackingEnsemble(method="auto", cv=5).fit(X_train, y_train)
    assert set(model.cv_auc_) == set(METHODS)
    assert model.method_ in ("logreg", "lgbm")  # the learned combiners can ignore noise
    assert roc_auc_score(y_test, model.predict_proba(X_test)[:, 1]) > 0.8
    assert set(model.predict(X_test)) <= {0, 1}


def test_auto_keeps_the_simplest_combiner_within_one_standard_error(monkeypatch):
    """LightGBM leading logistic regression by less than one standard error of its fold AUCs
    is noise: logistic regression is kept; a lead of several standard errors is not."""
    rng = np.random.default_rng(0)
    X, y = rng.uniform(size=(60, 3)), np.tile([0, 1], 30)
    lgbm_folds = [0.685, 0.725, 0.695, 0.715, 0.705]          # mean 0.705, standard error 0.007

    def fold_aucs(logreg_mean):
        table = {"mean": [0.6] * 5, "rank_mean": [0.6] * 5, "logreg": [logreg_mean] * 5, "lgbm": lgbm_folds}
        return lambda self, name, X, y: (table[name], X[:, 0])

    monkeypatch.setattr(StackingEnsemble, "_cross_validated", fold_aucs(0.700))
    assert StackingEnsemble(method="auto").fit(X, y).method_ == "logreg"
    monkeypatch.setattr(StackingEnsemble, "_cross_validated", fold_aucs(0.690))
    assert StackingEnsemble(method="auto").fit(X, y).method_ == "lgbm"


def test_auto_chooses_lightgbm_for_an_interaction_no_linear_combiner_fits():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(600, 4))
    xor = ((z[:, 0] > 0) ^ (z[:, 1] > 0)).astype(int)
    model = StackingEnsemble(method="auto", cv=5).fit(1 / (1 + np.exp(-z)), xor)
    assert model.method_ == "lgbm" and model.cv_auc_["lgbm"] > model.cv_auc_["logreg"] + 0.2


def test_feature_names_param_is_stored(train_test):
    """The expert of each column, recorded with the state; `feature_names_in_` stays what
    scikit-learn makes it: a DataFrame's column names, absent for an array."""
    X_train, y_train, _, _ = train_test
    model = StackingEnsemble(method="mean", feature_names=["xception", "clip", "tta_spread"]).fit(X_train, y_train)
    assert model.to_state()["params"]["feature_names"] == ["xception", "clip", "tta_spread"]
    assert not hasattr(model, "feature_names_in_")
    with pytest.raises(ValueError, match="2 feature names for 3 columns"):
        StackingEnsemble(method="mean", feature_names=["a", "b"]).fit(X_train, y_train)


@parametrize_with_checks([StackingEnsemble()])  # 'auto': every combiner is fitted inside
def test_passes_scikit_learns_estimator_checks(estimator, check):
    check(estimator)


def test_unfitted_use_raises_sklearns_not_fitted_error(train_test):
    _, _, X_test, _ = train_test
    with pytest.raises(NotFittedError):
        StackingEnsemble().predict_proba(X_test)
    with pytest.raises(NotFittedError):
        StackingEnsemble().predict(X_test)
    with pytest.raises(NotFittedError):
        StackingEnsemble().to_state()


def test_is_a_well_behaved_sklearn_estimator(train_test):
    X_train, y_train, _, _ = train_test
    model = StackingEnsemble(method="logreg", cv=3)
    copy = clone(model)
    assert copy.get_params()["cv"] == 3
    assert 0.5 < copy.fit(X_train, y_train).score(X_train, y_train) <= 1.0


def test_rejects_bad_input(train_test):
    X_train, y_train, _, _ = train_test
    with pytest.raises(ValueError, match="unknown method"):
        StackingEnsemble(method="vote").fit(X_train, y_train)
    with pytest.raises(ValueError, match="both labels"):
        StackingEnsemble().fit(X_train, np.ones(len(X_train)))
    model = StackingEnsemble(method="mean").fit(X_train, y_train)
    with pytest.raises(ValueError, match="X has 2 features, but StackingEnsemble is expecting 3"):
        model.predict_proba(X_train[:, :2])


def test_rank_mean_scores_a_single_row(train_test):
    X_train, y_train, X_test, _ = train_test
    model = StackingEnsemble(method="rank_mean", calibrate=False).fit(X_train, y_train)
    one_row = model.predict_proba(X_test[:1])
    assert one_row.shape == (1, 2)
    assert one_row == pytest.approx(model.predict_proba(X_test)[:1])
    # A row above every training score ranks at the top.
    assert model.predict_proba(np.full((1, 3), 2.0))[0, 1] == 1.0


# -- JSON serialisation -------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS + ["auto"])
def test_state_round_trip_through_json_is_exact(train_test, method):
    X_train, y_train, X_test, _ = train_test
    model = StackingEnsemble(method=method, feature_names=["a", "b", "c"]).fit(X_train, y_train)
    text = json.dumps(model.to_state())
    restored = StackingEnsemble.from_state(json.loads(text))
    assert np.array_equal(restored.predict_proba(X_test), model.predict_proba(X_test))
    assert restored.method_ == model.method_
    assert restored.cv_auc_ == model.cv_auc_
    assert restored.get_params() == model.get_params() and restored.feature_names == ["a", "b", "c"]
    assert np.array_equal(restored.predict(X_test), model.predict(X_test))


def test_a_state_written_before_the_sklearn_conventions_still_loads(train_test):
    """Older ensemble.json files repeat the feature names as `feature_names_in_` and have no
    `classes_`: they load, and predict as they did."""
    X_train, y_train, X_test, _ = train_test
    model = StackingEnsemble(method="logreg", feature_names=["a", "b", "c"]).fit(X_train, y_train)
    state = json.loads(json.dumps(model.to_state()))
    state["feature_names_in_"] = ["a", "b", "c"]
    del state["classes_"]
    restored = StackingEnsemble.from_state(state)
    assert not hasattr(restored, "feature_names_in_") and restored.classes_.tolist() == [0, 1]
    assert np.array_equal(restored.predict_proba(X_test), model.predict_proba(X_test))


def test_from_state_rejects_foreign_state():
    with pytest.raises(ValueError, match="format"):
        StackingEnsemble.from_state({"params": {}})


# -- out-of-fold guard ----------------------------------------------------------------

def test_check_out_of_fold_accepts_clean_ids():
    check_out_of_fold(
        score_ids={"xception": {"v3", "v4"}, "clip": ["v1", "v2"]},
        trained_ids={"xception": {"v1", "v2"}, "clip": set()},
    )


def test_check_out_of_fold_names_expert_and_leaked_ids():
    with pytest.raises(LeakageError, match="xception") as error:
        check_out_of_fold(
            score_ids={"clip": {"v3"}, "xception": {"v2", "v3", "v4"}},
            trained_ids={"clip": {"v1"}, "xception": {"v1", "v2"}},
        )
    assert "v2" in str(error.value)
    assert "v3" not in str(error.value)


def test_check_out_of_fold_lists_at_most_five_ids():
    leaked = [f"id{i:02d}" for i in range(20)]
    with pytest.raises(LeakageError, match="20 sample") as error:
        check_out_of_fold({"e": leaked}, {"e": leaked})
    assert "id04" in str(error.value) and "id05" not in str(error.value)


def test_check_out_of_fold_refuses_expert_without_training_record():
    with pytest.raises(LeakageError, match="no training ids"):
        check_out_of_fold({"e": ["a"]}, {})


def test_assemble_oof_matrix_builds_columns_in_expert_order():
    scores = {"a": {"x": 0.1, "y": 0.2, "z": 0.3}, "b": {"x": 0.9, "y": 0.8, "z": 0.7}}
    matrix = assemble_oof_matrix(scores, {"a": {"t1"}, "b": set()}, ids=["z", "x"])
    assert matrix.shape == (2, 2)
    assert np.array_equal(matrix, [[0.3, 0.7], [0.1, 0.9]])


def test_assemble_oof_matrix_refuses_leaked_input():
    scores = {"a": {"x": 0.1, "y": 0.2}, "b": {"x": 0.9, "y": 0.8}}
    with pytest.raises(LeakageError, match="'b'"):
        assemble_oof_matrix(scores, {"a": set(), "b": {"y"}}, ids=["x", "y"])


def test_assemble_oof_matrix_reports_missing_scores():
    with pytest.raises(ValueError, match="no score"):
        assemble_oof_matrix({"a": {"x": 0.1}}, {"a": set()}, ids=["x", "y"])


def anti_correlated_expert(n=400, seed=3):
    """Column 0 informative; column 1 scores reals higher than fakes (an expert that fails
    on this set's methods the wrong way round)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    good = 1 / (1 + np.exp(-(2.0 * (y - 0.5) + rng.normal(0, 1, n))))
    reversed_ = 1 / (1 + np.exp(-(-2.0 * (y - 0.5) + rng.normal(0, 1, n))))
    return np.column_stack([good, reversed_]), y


@pytest.mark.parametrize("method", ["logreg", "lgbm"])
def test_monotone_never_weights_an_expert_negatively(method):
    X, y = anti_correlated_expert()
    free = StackingEnsemble(method=method).fit(X, y)
    monotone = StackingEnsemble(method=method, monotone=[1, 1]).fit(X, y)
    # Raising only the reversed expert's score: the free learner lowers P(fake), the
    # monotone one never does.
    probe = np.column_stack([np.full(50, 0.5), np.linspace(0.01, 0.99, 50)])
    assert np.diff(free.predict_proba(probe)[:, 1]).min() < -1e-6
    assert np.diff(monotone.predict_proba(probe)[:, 1]).min() >= -1e-12
    if method == "logreg":
        assert monotone.combiner_.coef[0] > 0.1 and monotone.combiner_.coef[1] == 0.0


def test_monotone_logreg_matches_sklearn_when_the_bound_is_inactive(train_test):
    X_train, y_train, X_test, _ = train_test
    free = StackingEnsemble(method="logreg").fit(X_train[:, :1], y_train)
    bounded = StackingEnsemble(method="logreg", monotone=[1]).fit(X_train[:, :1], y_train)
    np.testing.assert_allclose(bounded.predict_proba(X_test[:, :1]), free.predict_proba(X_test[:, :1]), atol=1e-4)


def test_monotone_survives_json_and_checks_its_length():
    X, y = anti_correlated_expert()
    fitted = StackingEnsemble(method="logreg", monotone=[1, 0]).fit(X, y)
    state = json.loads(json.dumps(fitted.to_state()))
    np.testing.assert_array_equal(StackingEnsemble.from_state(state).predict_proba(X), fitted.predict_proba(X))
    with pytest.raises(ValueError, match="monotone has 1 entries for 2 columns"):
        StackingEnsemble(method="logreg", monotone=[1]).fit(X, y)


# -- score columns and the other columns ------------------------------------------------

def test_plain_and_rank_means_average_only_the_score_columns(train_test):
    """With n_scores, a TTA spread after the scores is an input of the learned
    combiners only: the plain and rank means stay means of the expert scores."""
    X_train, y_train, X_test, _ = train_test
    mean = StackingEnsemble(method="mean", n_scores=2, calibrate=False).fit(X_train, y_train)
    np.testing.assert_allclose(mean.predict_proba(X_test)[:, 1], X_test[:, :2].mean(axis=1))
    ranks = StackingEnsemble(method="rank_mean", n_scores=2, calibrate=False).fit(X_train, y_train)
    only_scores = StackingEnsemble(method="rank_mean", calibrate=False).fit(X_train[:, :2], y_train)
    np.testing.assert_allclose(ranks.predict_proba(X_test), only_scores.predict_proba(X_test[:, :2]))
    for model in (mean, ranks):
        restored = StackingEnsemble.from_state(json.loads(json.dumps(model.to_state())))
        assert np.array_equal(restored.predict_proba(X_test), model.predict_proba(X_test))
    with pytest.raises(ValueError, match="n_scores=4 score columns, but X has 3 columns"):
        StackingEnsemble(method="mean", n_scores=4).fit(X_train, y_train)


def test_a_mean_state_written_before_n_scores_averages_every_column(train_test):
    X_train, y_train, X_test, _ = train_test
    state = json.loads(json.dumps(StackingEnsemble(method="mean", calibrate=False).fit(X_train, y_train).to_state()))
    del state["params"]["n_scores"]
    state["combiner"] = {}
    np.testing.assert_allclose(StackingEnsemble.from_state(state).predict_proba(X_test)[:, 1], X_test.mean(axis=1))


# -- calibration -----------------------------------------------------------------------

def with_extra_fakes(n, seed):
    """Balanced scored rows, then as many extra fakes as there are reals, which the expert
    (column 0) scores like reals: the editing fakes of a hold-out fit."""
    X, y = synthetic_expert_scores(n, seed=seed, n_noise=2)
    rng = np.random.default_rng(seed + 100)
    n_reals = int((y == 0).sum())
    extra = np.column_stack([1 / (1 + np.exp(-(-1.0 + rng.normal(0, 1, n_reals))))] +
                            [rng.random(n_reals) for _ in range(2)])
    scored = np.r_[np.ones(len(y), bool), np.zeros(n_reals, bool)]
    return np.vstack([X, extra]), np.r_[y, np.ones(n_reals, int)], scored


@pytest.mark.parametrize("method", METHODS)
def test_calibration_on_the_scored_rows_undoes_the_tilt_of_extra_fakes(method):
    X, y, scored = with_extra_fakes(400, seed=0)
    X_test, y_test = synthetic_expert_scores(400, seed=1, n_noise=2)
    raw = StackingEnsemble(method=method, calibrate=False).fit(X, y).predict_proba(X_test)[:, 1]
    calibrated = StackingEnsemble(method=method).fit(X, y, calibration_rows=scored).predict_proba(X_test)[:, 1]
    assert expected_calibration_error(y_test, calibrated) < 0.08
    # the learned combiners learn the extra fakes' prior; the means learn nothing and are only rescaled
    tilted = method in ("logreg", "lgbm")
    ratio = 0.2 if tilted else 0.8
    assert expected_calibration_error(y_test, calibrated) < ratio * expected_calibration_error(y_test, raw)
    assert abs(calibrated.mean() - y_test.mean()) < 0.05
    # a monotone map: the ranking, and every ranking metric, is the combiner's own
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(calibrated[order]) >= -1e-12)
    assert roc_auc_score(y_test, calibrated) == pytest.approx(roc_auc_score(y_test, raw), abs=1e-9)


def test_calibration_rows_accept_indices_as_a_mask():
    X, y, scored = with_extra_fakes(200, seed=2)
    by_mask = StackingEnsemble(method="logreg").fit(X, y, calibration_rows=scored)
    by_index = StackingEnsemble(method="logreg").fit(X, y, calibration_rows=np.flatnonzero(scored))
    assert by_mask.calibration_ == by_index.calibration_ != (1.0, 0.0)


def test_platt_scaling_never_turns_a_ranking_round():
    y = np.tile([0, 1], 50)
    assert platt_scaling(np.where(y == 1, 0.2, 0.8), y) == (1.0, 0.0)  # scores rank fakes below reals
    slope, intercept = platt_scaling(np.where(y == 1, 0.7, 0.3) + np.linspace(-0.05, 0.05, 100), y)
    assert slope > 0


def test_platt_scaling_of_a_few_separable_rows_stays_finite():
    """Four perfectly separated clips must not map to P(fake) 0 and 1."""
    slope, intercept = platt_scaling(np.array([0.2, 0.3, 0.7, 0.8]), np.array([0, 0, 1, 1]))
    p = 1 / (1 + np.exp(-(slope * np.log(0.8 / 0.2) + intercept)))
    assert 0 < slope < 5 and 0.5 < p < 0.99


def test_a_state_written_before_calibration_predicts_as_it_did(train_test):
    X_train, y_train, X_test, _ = train_test
    uncalibrated = StackingEnsemble(method="logreg", calibrate=False).fit(X_train, y_train)
    state = json.loads(json.dumps(StackingEnsemble(method="logreg").fit(X_train, y_train).to_state()))
    del state["calibration_"], state["params"]["calibrate"]
    restored = StackingEnsemble.from_state(state)
    assert restored.calibration_ == (1.0, 0.0)
    np.testing.assert_array_equal(restored.predict_proba(X_test), uncalibrated.predict_proba(X_test))
