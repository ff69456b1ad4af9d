"""Fuse expert scores into one P(fake), plus guards against training leakage.

Each row of X holds the scores of several experts for one sample (columns
are experts; extra columns such as test-time-augmentation spread are fine,
after the scores: ``n_scores`` says how many columns are scores).
``StackingEnsemble`` learns how to combine them. With method='auto' it tries
four combiners by cross-validated AUC and keeps the best:

  mean       plain average of the score columns (no fitting)
  rank_mean  average of each score column's rank within the training scores
  logreg     logistic regression on logit-transformed, standardised scores
  lgbm       small LightGBM model

(each in `ensemble.combiners`). With ``calibrate`` (the default) the chosen combiner's output is
then mapped by a logistic curve in its logit (Platt scaling), fitted on that combiner's
cross-validated predictions of the calibration rows: the probabilities then mean what they
say on data like those rows, whatever else the combiner was fitted on (editing fakes, which
tilt the class balance). A monotone map: every ranking metric is unchanged. The fitted
ensemble is saved as JSON via ``to_state`` / ``from_state`` (no pickle, so a saved model
cannot run code when loaded).

A stacker is only honest if every score it sees is out-of-fold: no expert may
score a sample it was trained on. ``check_out_of_fold`` and
``assemble_oof_matrix`` enforce that.
"""

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from common.errors import UserError
from ensemble.combiners import (
    COMBINERS,
    DEFAULT_LGBM_PARAMS,
    LGBMCombiner,
    LogRegCombiner,
    logit,
    nonnegative_logistic,
    sigmoid,
)

# 'auto' tries these in order, simplest first, and keeps the simplest whose CV AUC is within
# one standard error of the best (the one-standard-error rule of Breiman et al., 1984): the
# validation folds come from the methods the experts trained on, and a small CV lead of a
# more flexible combiner is mostly fit to them. Measured on FF++: LightGBM led logistic
# regression by 0.002 CV AUC and lost 0.03 on the testset and on lfw_faceswap (RESULTS.md).
AUTO_CANDIDATES = ("mean", "rank_mean", "logreg", "lgbm")

STATE_FORMAT = "StackingEnsemble/1"


# --------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------

class StackingEnsemble(ClassifierMixin, BaseEstimator):
    """Combine expert scores (columns of X) into P(fake).

    A scikit-learn binary classifier (it passes `sklearn.utils.estimator_checks`): `fit(X, y)`
    with y holding two classes, the second in sorted order being "fake" (0/1 here: 1 = fake),
    `predict_proba(X)` (n, 2) and `predict(X)`; predicting before fitting raises sklearn's
    NotFittedError.

    Parameters
    ----------
    method : 'auto' | 'mean' | 'rank_mean' | 'logreg' | 'lgbm'
        'auto' picks, by mean per-fold AUC under StratifiedKFold, the simplest combiner
        within one standard error of the best (see AUTO_CANDIDATES).
    cv : number of folds for the cross-validated AUC (reduced automatically
        when the rarer class has fewer samples than folds).
    random_state : seed for the fold shuffling.
    feature_names : optional column names, recorded with the state (the expert of each
        column); a DataFrame's own column names go to ``feature_names_in_``.
    lgbm_params : overrides merged into DEFAULT_LGBM_PARAMS.
    monotone : optional 0/1 per column; 1 = P(fake) may only grow with this column
        (logreg: a non-negative coefficient; lgbm: a monotone constraint). Expert scores
        all mean "higher is faker": a learner that may weight one negatively fits how an
        expert fails on the validation set's own methods, which reverses on new ones.
    n_scores : how many leading columns are expert scores, the only ones the plain and
        rank means average (the others, e.g. TTA spreads, are inputs of the learned
        combiners only); None = every column.
    calibrate : Platt-scale the combiner's output on the calibration rows (`fit`'s
        ``calibration_rows``, default every row), from its cross-validated predictions.

    Fitted attributes: ``method_`` (chosen combiner), ``cv_auc_`` (method ->
    CV AUC; only the fixed method unless 'auto'), ``calibration_`` ((slope, intercept) of
    the map of the combiner's logit; (1, 0) = none), ``n_features_in_``, ``classes_``, and
    ``feature_names_in_`` when X was a DataFrame (scikit-learn's convention).
    """

    def __init__(self, method="auto", cv=5, random_state=0, feature_names=None, lgbm_params=None,
                 monotone=None, n_scores=None, calibrate=True):
        self.method = method
        self.cv = cv
        self.random_state = random_state
        self.feature_names = feature_names
        self.lgbm_params = lgbm_params
        self.monotone = monotone
        self.n_scores = n_scores
        self.calibrate = calibrate

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # real or fake
        return tags

    # -- fitting -----------------------------------------------------------

    def fit(self, X, y, calibration_rows=None):
        """Choose and fit the combiner on every row; `calibration_rows` (a boolean mask or
        indices, default every row): the rows whose class balance and scores the
        probabilities are calibrated to."""
        if self.method != "auto" and self.method not in COMBINERS:
            raise ValueError(f"unknown method {self.method!r}; use 'auto' or one of {sorted(COMBINERS)}")
        X, y = validate_data(self, X, y, dtype=float)
        check_classification_targets(y)
        if type_of_target(y, input_name="y") == "multiclass":
            raise ValueError("Only binary classification is supported: y holds real (0) and fake (1), "
                             f"got {len(np.unique(y))} classes")
        self.classes_, y = np.unique(y, return_inverse=True)
        if len(self.classes_) != 2:
            raise ValueError(f"y must hold both labels 0 (real) and 1 (fake): got only one class, {self.classes_}")
        if self.feature_names is not None and len(self.feature_names) != X.shape[1]:
            raise ValueError(f"{len(self.feature_names)} feature names for {X.shape[1]} columns")
        if self.monotone is not None and len(self.monotone) != X.shape[1]:
            raise ValueError(f"monotone has {len(self.monotone)} entries for {X.shape[1]} columns")
        if self.n_scores is not None and not 1 <= self.n_scores <= X.shape[1]:
            raise ValueError(f"n_scores={self.n_scores} score columns, but X has {X.shape[1]} columns")

        candidates = AUTO_CANDIDATES if self.method == "auto" else (self.method,)
        cross_validated = {name: self._cross_validated(name, X, y) for name in candidates}
        fold_aucs = {name: aucs for name, (aucs, _) in cross_validated.items()}
        self.cv_auc_ = {name: float(np.mean(aucs)) for name, aucs in fold_aucs.items()}
        best = max(candidates, key=lambda name: self.cv_auc_[name])
        standard_error = float(np.std(fold_aucs[best], ddof=1) / np.sqrt(len(fold_aucs[best])))
        self.method_ = next(name for name in candidates if self.cv_auc_[name] >= self.cv_auc_[best] - standard_error)
        self.combiner_ = self._new_combiner(self.method_).fit(X, y)
        self.calibration_ = (1.0, 0.0)
        if self.calibrate:
            rows = np.arange(len(y)) if calibration_rows is None else np.asarray(calibration_rows)
            out_of_fold = cross_validated[self.method_][1]
            self.calibration_ = platt_scaling(out_of_fold[rows], y[rows])
        return self

    def _new_combiner(self, name):
        monotone = None if self.monotone is None else [int(bool(m)) for m in self.monotone]
        if name == "lgbm":
            params = {**DEFAULT_LGBM_PARAMS, **(self.lgbm_params or {})}
            if monotone is not None:
                params["monotone_constraints"] = monotone
            return LGBMCombiner(params)
        if name == "logreg":
            return LogRegCombiner(monotone=monotone)
        return COMBINERS[name](n_columns=self.n_scores)  # mean, rank_mean: of the scores only

    def _cross_validated(self, name, X, y) -> tuple[list[float], np.ndarray]:
        """(AUC on each stratified fold, every row's prediction) of a fresh combiner fitted
        on the other folds."""
        n_splits = min(self.cv, int(np.bincount(y).min()))
        if n_splits < 2:
            raise ValueError("need at least 2 samples of each class for cross-validation")
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
        aucs, out_of_fold = [], np.zeros(len(y))
        for train, test in folds.split(X, y):
            combiner = self._new_combiner(name).fit(X[train], y[train])
            out_of_fold[test] = combiner.predict(X[test])
            aucs.append(roc_auc_score(y[test], out_of_fold[test]))
        return aucs, out_of_fold

    # -- prediction --------------------------------------------------------

    def predict_proba(self, X):
        """(n, 2) array: column 0 = P(real), column 1 = P(fake)."""
        check_is_fitted(self)
        X = validate_data(self, self._columns_in_training_order(X), dtype=float, reset=False)
        p_fake = np.clip(self.combiner_.predict(X), 0.0, 1.0)
        slope, intercept = self.calibration_
        if (slope, intercept) != (1.0, 0.0):
            p_fake = sigmoid(slope * logit(p_fake) + intercept)
        return np.column_stack([1.0 - p_fake, p_fake])

    def predict(self, X):
        """The more probable class (1 = fake where P(fake) > 0.5)."""
        p = self.predict_proba(X)  # first: it raises NotFittedError before classes_ is looked up
        return self.classes_[np.argmax(p, axis=1)]

    def _columns_in_training_order(self, X):
        """A DataFrame's columns put in the order seen at fit time, when it was fitted on one."""
        names = getattr(X, "columns", None)
        fitted = getattr(self, "feature_names_in_", None)
        if names is None or fitted is None:
            return X
        missing = [n for n in fitted if n not in set(map(str, names))]
        if missing:
            raise ValueError(f"X lacks columns the ensemble was fitted on: {missing}")
        return X[list(fitted)]

    # -- JSON serialisation ------------------------------------------------

    def to_state(self):
        """JSON-serialisable dict holding everything needed to predict."""
        check_is_fitted(self)
        params = self.get_params()
        if params["feature_names"] is not None:
            params["feature_names"] = list(params["feature_names"])
        if params["monotone"] is not None:
            params["monotone"] = [int(bool(m)) for m in params["monotone"]]
        fitted_names = getattr(self, "feature_names_in_", None)
        return {
            "format": STATE_FORMAT,
            "params": params,
            "method_": self.method_,
            "cv_auc_": self.cv_auc_,
            "n_features_in_": int(self.n_features_in_),
            "feature_names_in_": None if fitted_names is None else [str(n) for n in fitted_names],
            "classes_": self.classes_.tolist(),
            "combiner": self.combiner_.to_state(),
            "calibration_": [float(v) for v in self.calibration_],
        }

    @classmethod
    def from_state(cls, state):
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state (format={state.get('format')!r})")
        ensemble = cls(**state["params"])
        ensemble.method_ = state["method_"]
        ensemble.cv_auc_ = dict(state["cv_auc_"])
        ensemble.n_features_in_ = state["n_features_in_"]
        # States written before the DataFrame convention repeat the `feature_names` param here.
        fitted_names = state.get("feature_names_in_")
        if fitted_names is not None and fitted_names != state["params"].get("feature_names"):
            ensemble.feature_names_in_ = np.asarray(fitted_names, dtype=object)
        ensemble.classes_ = np.asarray(state.get("classes_", [0, 1]))
        ensemble.combiner_ = COMBINERS[ensemble.method_].from_state(state["combiner"])
        # States written before calibration existed predict as they did: no map.
        ensemble.calibration_ = tuple(float(v) for v in state.get("calibration_", (1.0, 0.0)))
        return ensemble


def platt_scaling(p, y) -> tuple[float, float]:
    """(slope, intercept) of P(fake) = sigmoid(slope * logit(p) + intercept) fitted to the
    labels y (Platt, 1999), the slope kept >= 0 so that no ranking turns round; (1, 0), no
    map, where the scores do not rank fakes above reals at all (slope 0). The slope's L2
    penalty (C = 1 against the summed log-loss) is nothing on hundreds of rows and keeps a
    handful of separable ones (a video stacker's clips) from an infinite slope."""
    slope, intercept = nonnegative_logistic(logit(np.asarray(p, float))[:, None], np.asarray(y), [1], C=1.0)
    if slope[0] <= 0.0:
        return 1.0, 0.0
    return float(slope[0]), intercept


# --------------------------------------------------------------------------
# Out-of-fold guard
# --------------------------------------------------------------------------

class LeakageError(UserError):
    """An expert's score was computed on a sample that expert was trained on (a data problem
    the user fixes, so a command line ends with its one-line message)."""


def check_out_of_fold(score_ids, trained_ids):
    """Raise LeakageError unless every scored id is outside that expert's training set.

    score_ids:   expert name -> ids the expert produced scores for.
    trained_ids: expert name -> ids the expert was trained (or tuned) on.
    Ids are compared with ==, so both sides must use the same id type.
    An expert missing from ``trained_ids`` cannot be verified and is refused;
    pass an empty set for an expert that never saw our data.
    """
    for expert, scored in score_ids.items():
        if expert not in trained_ids:
            raise LeakageError(
                f"no training ids recorded for expert {expert!r}; cannot verify its scores "
                "are out-of-fold (pass an empty set if it never trained on this data)"
            )
        leaked = set(scored) & set(trained_ids[expert])
        if leaked:
            examples = sorted(leaked, key=str)[:5]
            raise LeakageError(
                f"expert {expert!r} scored {len(leaked)} sample(s) it was trained on, "
                f"e.g. {examples}"
            )


def assemble_oof_matrix(expert_scores, trained_ids, ids):
    """Matrix (len(ids), n_experts) of out-of-fold scores, columns in expert_scores order.

    expert_scores: expert name -> {sample id -> score}.
    Raises LeakageError if any requested id is in that expert's training set,
    and ValueError if an expert has no score for a requested id.
    """
    ids = list(ids)
    check_out_of_fold({expert: ids for expert in expert_scores}, trained_ids)
    columns = []
    for expert, scores in expert_scores.items():
        missing = [i for i in ids if i not in scores]
        if missing:
            raise ValueError(f"expert {expert!r} has no score for {len(missing)} id(s), e.g. {missing[:5]}")
        columns.append([float(scores[i]) for i in ids])
    return np.array(columns, dtype=float).T.reshape(len(ids), len(expert_scores))
