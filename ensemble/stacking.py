"""Fuse expert scores into one P(fake), plus guards against training leakage.

Each row of X holds the scores of several experts for one sample (columns
are experts; extra columns such as test-time-augmentation spread are fine).
``StackingEnsemble`` learns how to combine them. With method='auto' it tries
four combiners by cross-validated AUC and keeps the best:

  mean       plain average of the columns (no fitting)
  rank_mean  average of each column's rank within the training scores
  logreg     logistic regression on logit-transformed, standardised scores
  lgbm       small LightGBM model

The fitted ensemble is saved as JSON via ``to_state`` / ``from_state``
(no pickle, so a saved model cannot run code when loaded).

A stacker is only honest if every score it sees is out-of-fold: no expert may
score a sample it was trained on. ``check_out_of_fold`` and
``assemble_oof_matrix`` enforce that.
"""

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from common.errors import UserError

# Small trees and strong leaf minimums: stacking data has few rows.
DEFAULT_LGBM_PARAMS = {
    "num_leaves": 7,
    "n_estimators": 200,
    "learning_rate": 0.05,
    "min_child_samples": 10,
    "verbose": -1,
    "n_jobs": 1,
}

# 'auto' tries these in order; on equal CV AUC the earlier (simpler) one wins.
AUTO_CANDIDATES = ("mean", "rank_mean", "logreg", "lgbm")

PROBABILITY_CLIP = 1e-6
STATE_FORMAT = "StackingEnsemble/1"


# --------------------------------------------------------------------------
# Combiners: each has fit(X, y), predict(X) -> P(fake), to_state(), from_state()
# --------------------------------------------------------------------------

class _MeanCombiner:
    name = "mean"

    def fit(self, X, y):
        return self

    def predict(self, X):
        return X.mean(axis=1)

    def to_state(self):
        return {}

    @classmethod
    def from_state(cls, state):
        return cls()


class _RankMeanCombiner:
    """Average, over columns, of where a score falls in that column's training scores.

    A test score's rank is its mid-rank among the sorted training scores
    (ties count half), divided by the number of training rows, so it lies in
    [0, 1] and a single test row can be scored on its own.
    """
    name = "rank_mean"

    def __init__(self, sorted_columns=None):
        self.sorted_columns = sorted_columns

    def fit(self, X, y):
        self.sorted_columns = [np.sort(X[:, j]) for j in range(X.shape[1])]
        return self

    def predict(self, X):
        ranks = [self._rank(column, X[:, j]) for j, column in enumerate(self.sorted_columns)]
        return np.mean(ranks, axis=0)

    @staticmethod
    def _rank(sorted_train, values):
        below = np.searchsorted(sorted_train, values, side="left")
        below_or_equal = np.searchsorted(sorted_train, values, side="right")
        return (below + below_or_equal) / (2.0 * len(sorted_train))

    def to_state(self):
        return {"sorted_columns": [column.tolist() for column in self.sorted_columns]}

    @classmethod
    def from_state(cls, state):
        return cls([np.asarray(column, dtype=float) for column in state["sorted_columns"]])


def _logit(p):
    p = np.clip(p, PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    return np.log(p) - np.log1p(-p)


class _LogRegCombiner:
    """Logistic regression on standardised logit(score).

    Expert scores are probabilities squeezed near 0 and 1; the logit spreads
    them out so a linear model can use confident scores. Prediction is done in
    numpy from the stored coefficients, so a reloaded model gives identical
    output.
    """
    name = "logreg"

    def __init__(self, mean=None, scale=None, coef=None, intercept=0.0, monotone=None):
        self.mean, self.scale, self.coef, self.intercept = mean, scale, coef, intercept
        self.monotone = monotone

    def fit(self, X, y):
        z = _logit(X)
        self.mean = z.mean(axis=0)
        self.scale = z.std(axis=0)
        self.scale[self.scale == 0] = 1.0  # constant column: leave it unscaled
        z = (z - self.mean) / self.scale
        if self.monotone is None or not any(self.monotone):
            model = LogisticRegression(C=1.0, max_iter=1000).fit(z, y)
            self.coef, self.intercept = model.coef_.ravel(), float(model.intercept_[0])
        else:
            self.coef, self.intercept = _nonnegative_logistic(z, y, self.monotone, C=1.0)
        return self

    def predict(self, X):
        z = (_logit(X) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def to_state(self):
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept}

    @classmethod
    def from_state(cls, state):
        return cls(np.asarray(state["mean"]), np.asarray(state["scale"]),
                   np.asarray(state["coef"]), float(state["intercept"]))


def _nonnegative_logistic(z, y, monotone, C):
    """L2-regularised logistic regression (sklearn's objective: 0.5 |w|^2 + C * log-loss)
    whose coefficient j is >= 0 wherever monotone[j] is 1 (Breiman's non-negative stacking)."""
    from scipy.optimize import minimize

    sign = 2.0 * y - 1.0

    def objective(params):
        w, b = params[:-1], params[-1]
        margin = sign * (z @ w + b)
        loss = np.logaddexp(0.0, -margin)
        grad_margin = -sign * np.exp(-np.logaddexp(0.0, margin))  # d loss / d (z w + b)
        value = 0.5 * w @ w + C * loss.sum()
        grad = np.append(w + C * (z.T @ grad_margin), C * grad_margin.sum())
        return value, grad

    bounds = [(0.0, None) if m else (None, None) for m in monotone] + [(None, None)]
    result = minimize(objective, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B", bounds=bounds)
    return result.x[:-1], float(result.x[-1])


class _LGBMCombiner:
    """LightGBM classifier; predictions always come from the model text.

    Predicting from the booster rebuilt from ``model_to_string`` (even right
    after fit) guarantees a reloaded model scores exactly like the original.
    """
    name = "lgbm"

    def __init__(self, params=None, model_string=None):
        self.params = params or DEFAULT_LGBM_PARAMS
        self.model_string = model_string
        self._booster = None if model_string is None else self._load(model_string)

    @staticmethod
    def _load(model_string):
        import lightgbm
        return lightgbm.Booster(model_str=model_string)

    def fit(self, X, y):
        import lightgbm
        model = lightgbm.LGBMClassifier(**self.params)  # monotone: params["monotone_constraints"]
        model.fit(X, y)
        self.model_string = model.booster_.model_to_string()
        self._booster = self._load(self.model_string)
        return self

    def predict(self, X):
        return self._booster.predict(X, num_threads=1)

    def to_state(self):
        return {"model_string": self.model_string}

    @classmethod
    def from_state(cls, state):
        return cls(model_string=state["model_string"])


COMBINERS = {c.name: c for c in (_MeanCombiner, _RankMeanCombiner, _LogRegCombiner, _LGBMCombiner)}


# --------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------

def _column_names(X):
    """Column names of a DataFrame-like X, else None (pandas is not required)."""
    columns = getattr(X, "columns", None)
    return None if columns is None else [str(c) for c in columns]


class StackingEnsemble(BaseEstimator, ClassifierMixin):
    """Combine expert scores (columns of X) into P(fake).

    Parameters
    ----------
    method : 'auto' | 'mean' | 'rank_mean' | 'logreg' | 'lgbm'
        'auto' picks the combiner with the best mean per-fold AUC under
        StratifiedKFold (ties go to the simpler one, see AUTO_CANDIDATES).
    cv : number of folds for the cross-validated AUC (reduced automatically
        when the rarer class has fewer samples than folds).
    random_state : seed for the fold shuffling.
    feature_names : optional column names (taken from X.columns when X is a
        DataFrame).
    lgbm_params : overrides merged into DEFAULT_LGBM_PARAMS.
    monotone : optional 0/1 per column; 1 = P(fake) may only grow with this column
        (logreg: a non-negative coefficient; lgbm: a monotone constraint). Expert scores
        all mean "higher is faker": a learner that may weight one negatively fits how an
        expert fails on the validation set's own methods, which reverses on new ones.

    Fitted attributes: ``method_`` (chosen combiner), ``cv_auc_`` (method ->
    CV AUC; only the fixed method unless 'auto'), ``n_features_in_``,
    ``feature_names_in_`` (list or None), ``classes_``.
    """

    def __init__(self, method="auto", cv=5, random_state=0, feature_names=None, lgbm_params=None,
                 monotone=None):
        self.method = method
        self.cv = cv
        self.random_state = random_state
        self.feature_names = feature_names
        self.lgbm_params = lgbm_params
        self.monotone = monotone

    # -- fitting -----------------------------------------------------------

    def fit(self, X, y):
        names = _column_names(X) or (list(self.feature_names) if self.feature_names is not None else None)
        X, y = self._validate_training_data(X, y)
        if names is not None and len(names) != X.shape[1]:
            raise ValueError(f"{len(names)} feature names for {X.shape[1]} columns")
        if self.monotone is not None and len(self.monotone) != X.shape[1]:
            raise ValueError(f"monotone has {len(self.monotone)} entries for {X.shape[1]} columns")

        candidates = AUTO_CANDIDATES if self.method == "auto" else (self.method,)
        self.cv_auc_ = {name: self._cross_validated_auc(name, X, y) for name in candidates}
        # max() keeps the first of equal values, i.e. the simpler method.
        self.method_ = max(candidates, key=lambda name: self.cv_auc_[name])
        self.combiner_ = self._new_combiner(self.method_).fit(X, y)

        self.n_features_in_ = X.shape[1]
        self.feature_names_in_ = names
        self.classes_ = np.array([0, 1])
        return self

    def _validate_training_data(self, X, y):
        if self.method != "auto" and self.method not in COMBINERS:
            raise ValueError(f"unknown method {self.method!r}; use 'auto' or one of {sorted(COMBINERS)}")
        X = self._as_matrix(X)
        y = np.asarray(y).ravel()
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
        if not np.all(np.isin(y, (0, 1))) or len(np.unique(y)) < 2:
            raise ValueError("y must contain both labels 0 (real) and 1 (fake) and nothing else")
        return X, y.astype(int)

    @staticmethod
    def _as_matrix(X):
        X = np.asarray(X, dtype=float)
        if X.ndim == 1:
            X = X[:, None]  # a single expert given as a vector
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (samples x experts), got shape {X.shape}")
        if not np.all(np.isfinite(X)):
            raise ValueError("X contains NaN/inf scores")
        return X

    def _new_combiner(self, name):
        monotone = None if self.monotone is None else [int(bool(m)) for m in self.monotone]
        if name == "lgbm":
            params = {**DEFAULT_LGBM_PARAMS, **(self.lgbm_params or {})}
            if monotone is not None:
                params["monotone_constraints"] = monotone
            return _LGBMCombiner(params)
        if name == "logreg":
            return _LogRegCombiner(monotone=monotone)
        return COMBINERS[name]()

    def _cross_validated_auc(self, name, X, y):
        """Mean AUC over stratified folds of a fresh combiner fitted on each training split."""
        n_splits = min(self.cv, int(np.bincount(y).min()))
        if n_splits < 2:
            raise ValueError("need at least 2 samples of each class for cross-validation")
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
        aucs = []
        for train, test in folds.split(X, y):
            combiner = self._new_combiner(name).fit(X[train], y[train])
            aucs.append(roc_auc_score(y[test], combiner.predict(X[test])))
        return float(np.mean(aucs))

    # -- prediction --------------------------------------------------------

    def predict_proba(self, X):
        """(n, 2) array: column 0 = P(real), column 1 = P(fake)."""
        if not hasattr(self, "combiner_"):
            raise RuntimeError("StackingEnsemble is not fitted; call fit() or from_state() first")
        X = self._as_matrix(self._columns_in_training_order(X))
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} columns, the ensemble was fitted on {self.n_features_in_}")
        p_fake = np.clip(self.combiner_.predict(X), 0.0, 1.0)
        return np.column_stack([1.0 - p_fake, p_fake])

    def predict(self, X):
        """1 = fake where P(fake) >= 0.5."""
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(int)

    def _columns_in_training_order(self, X):
        """Reorder a DataFrame's columns by name when names were seen at fit time."""
        names = _column_names(X)
        if names is None or self.feature_names_in_ is None:
            return X
        missing = [n for n in self.feature_names_in_ if n not in names]
        if missing:
            raise ValueError(f"X lacks columns the ensemble was fitted on: {missing}")
        return np.column_stack([np.asarray(X[name], dtype=float) for name in self.feature_names_in_])

    # -- JSON serialisation ------------------------------------------------

    def to_state(self):
        """JSON-serialisable dict holding everything needed to predict."""
        params = self.get_params()
        if params["feature_names"] is not None:
            params["feature_names"] = list(params["feature_names"])
        if params["monotone"] is not None:
            params["monotone"] = [int(bool(m)) for m in params["monotone"]]
        return {
            "format": STATE_FORMAT,
            "params": params,
            "method_": self.method_,
            "cv_auc_": self.cv_auc_,
            "n_features_in_": int(self.n_features_in_),
            "feature_names_in_": self.feature_names_in_,
            "combiner": self.combiner_.to_state(),
        }

    @classmethod
    def from_state(cls, state):
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a {STATE_FORMAT} state (format={state.get('format')!r})")
        ensemble = cls(**state["params"])
        ensemble.method_ = state["method_"]
        ensemble.cv_auc_ = dict(state["cv_auc_"])
        ensemble.n_features_in_ = state["n_features_in_"]
        ensemble.feature_names_in_ = state["feature_names_in_"]
        ensemble.classes_ = np.array([0, 1])
        ensemble.combiner_ = COMBINERS[ensemble.method_].from_state(state["combiner"])
        return ensemble


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
