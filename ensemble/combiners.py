"""The four ways `ensemble.stacking.StackingEnsemble` can combine expert scores.

Each combiner has fit(X, y), predict(X) -> P(fake) (n,), to_state() -> a JSON-serialisable
dict, and from_state(state); X holds one row per sample: the experts' scores first, then any
other columns (the TTA spreads).

  MeanCombiner      plain average of the score columns (no fitting)
  RankMeanCombiner  average of each score column's rank within the training scores
  LogRegCombiner    logistic regression on logit-transformed, standardised scores
  LGBMCombiner      small LightGBM model
"""
import numpy as np
from sklearn.linear_model import LogisticRegression

from common.metrics import rank_against

# Small trees and strong leaf minimums: stacking data has few rows.
DEFAULT_LGBM_PARAMS = {
    "num_leaves": 7,
    "n_estimators": 200,
    "learning_rate": 0.05,
    "min_child_samples": 10,
    "verbose": -1,
    "n_jobs": 1,
}


PROBABILITY_CLIP = 1e-6


class MeanCombiner:
    """Average of the first `n_columns` columns, the expert scores (None: every column, as
    states written before there were other columns)."""
    name = "mean"

    def __init__(self, n_columns=None):
        self.n_columns = n_columns

    def fit(self, X, y):
        return self

    def predict(self, X):
        return X[:, : self.n_columns].mean(axis=1)

    def to_state(self):
        return {"n_columns": self.n_columns}

    @classmethod
    def from_state(cls, state):
        return cls(state.get("n_columns"))


class RankMeanCombiner:
    """Average, over the first `n_columns` columns (the expert scores; None: all), of where a
    score falls in that column's training scores.

    A test score's rank is its mid-rank among the sorted training scores
    (ties count half), divided by the number of training rows, so it lies in
    [0, 1] and a single test row can be scored on its own.
    """
    name = "rank_mean"

    def __init__(self, sorted_columns=None, n_columns=None):
        self.sorted_columns = sorted_columns
        self.n_columns = n_columns

    def fit(self, X, y):
        self.sorted_columns = [np.sort(column) for column in X[:, : self.n_columns].T]
        return self

    def predict(self, X):
        ranks = [rank_against(column, X[:, j]) for j, column in enumerate(self.sorted_columns)]
        return np.mean(ranks, axis=0)

    def to_state(self):
        return {"sorted_columns": [column.tolist() for column in self.sorted_columns]}

    @classmethod
    def from_state(cls, state):
        return cls([np.asarray(column, dtype=float) for column in state["sorted_columns"]])


def logit(p):
    p = np.clip(p, PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    return np.log(p) - np.log1p(-p)


def sigmoid(z):
    """The inverse of `logit` (without its clipping)."""
    return 1.0 / (1.0 + np.exp(-z))


class LogRegCombiner:
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
        z = logit(X)
        self.mean = z.mean(axis=0)
        self.scale = z.std(axis=0)
        self.scale[self.scale == 0] = 1.0  # constant column: leave it unscaled
        z = (z - self.mean) / self.scale
        if self.monotone is None or not any(self.monotone):
            model = LogisticRegression(C=1.0, max_iter=1000).fit(z, y)
            self.coef, self.intercept = model.coef_.ravel(), float(model.intercept_[0])
        else:
            self.coef, self.intercept = nonnegative_logistic(z, y, self.monotone, C=1.0)
        return self

    def predict(self, X):
        z = (logit(X) - self.mean) / self.scale
        return sigmoid(z @ self.coef + self.intercept)

    def to_state(self):
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept}

    @classmethod
    def from_state(cls, state):
        return cls(np.asarray(state["mean"]), np.asarray(state["scale"]),
                   np.asarray(state["coef"]), float(state["intercept"]))


def nonnegative_logistic(z, y, monotone, C):
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


class LGBMCombiner:
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


COMBINERS = {c.name: c for c in (MeanCombiner, RankMeanCombiner, LogRegCombiner, LGBMCombiner)}
