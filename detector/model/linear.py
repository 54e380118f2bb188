"""A binary logistic regression as its coefficients (over standardised features)."""

from __future__ import annotations

from typing import Any

import numpy as np

from detector.model.trees import Explained, TreeError, _logistic


class CompiledLogistic:
    """`coef` (n_features,) and `intercept` of a fitted binary logistic regression.

    Contributions are coefficient x standardised value, in log-odds; with the intercept as
    base value they sum to the margin. Raises TreeError (a ValueError) on inconsistent arrays.
    """

    def __init__(self, arrays: dict[str, np.ndarray], n_features: int) -> None:
        self.coef = np.asarray(arrays["coef"], dtype=np.float64).ravel()
        intercept = np.asarray(arrays["intercept"], dtype=np.float64).ravel()
        if self.coef.shape != (n_features,) or intercept.shape != (1,):
            raise TreeError(f"expected {n_features} coefficients and one intercept")
        if not (np.isfinite(self.coef).all() and np.isfinite(intercept).all()):
            raise TreeError("coefficients must be finite")
        self.intercept = float(intercept[0])

    @staticmethod
    def from_sklearn(model: Any) -> dict[str, np.ndarray]:
        return {
            "coef": np.asarray(model.coef_, dtype=np.float64).ravel(),
            "intercept": np.asarray(model.intercept_, dtype=np.float64).ravel(),
        }

    def explain(self, scaled: np.ndarray, with_contributions: bool = True) -> Explained:
        margin = scaled @ self.coef + self.intercept
        return Explained(
            _logistic(margin),
            margin,
            self.intercept,
            scaled * self.coef if with_contributions else None,
        )
