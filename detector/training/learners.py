"""The three model families as training sees them: fit on a feature frame, predict, export.

* `lightgbm`: gradient-boosted trees (LightGBM), the default. Missing values stay missing (the
  trees learn where to send them), the categorical codes (`FeatureSpec.kind`) are split as
  sets, the number of trees is chosen by early stopping on clients held out of each fit.
* `random_forest` and `logistic_regression`: the seed models, over the same features with
  missing values filled by the training split's medians and standardised.

Every fit is seeded; LightGBM runs with `deterministic=True`, so a retrain on the same data
gives the same model version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from detector.features import CANDIDATE_INDEX

MAX_CATEGORY = 2**31 - 2  # LightGBM reads categorical codes as int32


def categorical(columns: pd.Index | list[str]) -> list[int]:
    """Positions of the categorical codes among these feature columns."""
    return [i for i, name in enumerate(columns) if CANDIDATE_INDEX[name].kind == "categorical"]


# Chosen by 5-fold cross-validation on the training split over full and truncated histories
# (docs/MODEL_CARD.md, "How the model was chosen"): 31 leaves at most 8 deep lost nothing against
# unbounded depth and bound the walk; a learning rate of 0.1 cost 0.002 ROC-AUC; 15 leaves or
# 63 leaves, 200 clients per leaf or feature_fraction 0.5 changed nothing beyond +-0.001.
BOOSTING_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "max_depth": 8,
    "min_child_samples": 50,
    "feature_fraction": 0.7,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
}
MAX_ROUNDS = 3000
EARLY_STOPPING_ROUNDS = 100
# Leaves of at least 30 clients keep the forest small enough to download on a cold start; 100
# trees rank as well as 150 (CV ROC-AUC 0.8459 +- 0.0010 against 0.8464 +- 0.0008).
FOREST_PARAMS: dict[str, Any] = {
    "n_estimators": 100,
    "min_samples_leaf": 30,
    "max_features": 0.33,
}
LOGISTIC_PARAMS: dict[str, Any] = {"C": 1.0, "max_iter": 2000}


@dataclass
class Preprocessing:
    """Fill values (training medians; the mode for a categorical code) and a standard scaler,
    both fitted on the training split's full histories."""

    fill_values: np.ndarray
    mean: np.ndarray
    scale: np.ndarray

    @staticmethod
    def fit(features: pd.DataFrame) -> Preprocessing:
        values = features.to_numpy(dtype=np.float64)
        fill = np.nanmedian(values, axis=0) if len(values) else np.zeros(values.shape[1])
        for i in categorical(features.columns):
            column = pd.Series(values[:, i]).dropna()
            fill[i] = float(column.mode().min()) if len(column) else 0.0
        fill = np.where(np.isnan(fill), 0.0, fill)
        filled = np.where(np.isnan(values), fill, values)
        mean = filled.mean(axis=0)
        scale = filled.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)  # as StandardScaler: constant columns unscaled
        return Preprocessing(fill, mean, scale)

    def transform(self, features: pd.DataFrame) -> np.ndarray:
        values = features.to_numpy(dtype=np.float64)
        filled = np.where(np.isnan(values), self.fill_values, values)
        scaled: np.ndarray = (filled - self.mean) / self.scale
        return scaled


def _boosting_matrix(features: pd.DataFrame) -> np.ndarray:
    values = features.to_numpy(dtype=np.float64, copy=True)
    for i in categorical(features.columns):
        column = values[:, i]
        column[(column < 0) | (column > MAX_CATEGORY)] = np.nan  # never seen as a category
    return values


@dataclass
class Fitted:
    """A fitted model of one family, with what its export needs."""

    kind: str
    model: Any
    rounds: int | None = None  # trees of a boosted model (chosen by early stopping)

    def predict(self, features: pd.DataFrame, prep: Preprocessing) -> np.ndarray:
        if self.kind == "lightgbm":
            scores = self.model.predict(_boosting_matrix(features))
        else:
            scores = self.model.predict_proba(prep.transform(features))[:, 1]
        return np.asarray(scores, dtype=np.float64)


def fit(
    kind: str,
    features: pd.DataFrame,
    labels: np.ndarray,
    prep: Preprocessing,
    seed: int,
    n_jobs: int,
    params: dict[str, Any] | None = None,
    rounds: int | None = None,
    valid: tuple[pd.DataFrame, np.ndarray] | None = None,
) -> Fitted:
    """Fit one family. A boosted model stops early on `valid` when given, else grows `rounds`
    trees."""
    if kind == "lightgbm":
        import lightgbm as lgb

        config = {
            **BOOSTING_PARAMS,
            **(params or {}),
            "seed": seed,
            "deterministic": True,
            "force_col_wise": True,
            "num_threads": max(0, n_jobs),
            "verbose": -1,
        }
        train_set = lgb.Dataset(
            _boosting_matrix(features),
            labels,
            feature_name=list(features.columns),
            categorical_feature=categorical(features.columns),
            free_raw_data=True,
        )
        if valid is None:
            booster = lgb.train(config, train_set, num_boost_round=rounds or 100)
            return Fitted(kind, booster, booster.current_iteration())
        valid_set = lgb.Dataset(
            _boosting_matrix(valid[0]),
            valid[1],
            categorical_feature=categorical(features.columns),
            reference=train_set,
        )
        booster = lgb.train(
            config,
            train_set,
            num_boost_round=MAX_ROUNDS,
            valid_sets=[valid_set],
            callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)],
        )
        return Fitted(kind, booster, booster.best_iteration)
    x = prep.transform(features)
    if kind == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        forest = RandomForestClassifier(
            **{**FOREST_PARAMS, **(params or {})}, random_state=seed, n_jobs=n_jobs
        )
        return Fitted(kind, forest.fit(x, labels))
    if kind == "logistic_regression":
        from sklearn.linear_model import LogisticRegression

        return Fitted(kind, LogisticRegression(**LOGISTIC_PARAMS).fit(x, labels))
    raise ValueError(f"unknown model kind {kind!r}")


def params_of(fitted: Fitted) -> dict[str, Any]:
    """The hyper-parameters worth reporting (JSON-ready)."""
    if fitted.kind == "lightgbm":
        return {**BOOSTING_PARAMS, "num_trees": fitted.rounds}
    model_params = fitted.model.get_params()
    keys = FOREST_PARAMS if fitted.kind == "random_forest" else LOGISTIC_PARAMS
    return {k: model_params[k] for k in (*keys, "random_state") if k in model_params}
