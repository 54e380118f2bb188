"""The references every in-process row is compared with: LightGBM itself, on the set's own model.

Training writes the gradient-boosted model twice: `lightgbm.npz`, the arrays our numpy walker
(`detector.model.CompiledTrees`) serves, and `lightgbm.txt`, LightGBM's own text model. The
references load the latter with `lightgbm.Booster(model_file=...)`, so both sides score the
same trees:

* plain: `Booster.predict` called from Python, as a naive server would call it (no arguments:
  LightGBM's default threads, all cores; each call builds a predictor and converts the input);
* limit: the same C++ prediction without the Python wrapper's per-call work, through LightGBM's
  C API with `num_threads=1`: `LGBM_BoosterPredictForMatSingleRowFast` for one row (the
  fastest single-row path LightGBM has: its configuration is parsed once, here at load) and
  `LGBM_BoosterPredictForMat` for a batch, also with every core;
* contributions: the same entry points with `pred_contrib` (`C_API_PREDICT_CONTRIB`: TreeSHAP,
  exact Shapley values, in C++), beside our path contributions (Saabas).

LightGBM reads a missing value (NaN) and a categorical code itself, exactly as the served path
does, so every reference gets the raw rows as they are: nothing is imputed or scaled.

`agreement` checks ours against LightGBM on the same rows: probabilities, the raw margin our
contributions sum to, and how often our top reason is TreeSHAP's top feature.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.model import ArtifactSet
from detector.reasons import explain_rows

Predict = Callable[[np.ndarray], np.ndarray]

# c_api.h
DTYPE_FLOAT64 = 1
PREDICT_NORMAL, PREDICT_RAW_SCORE, PREDICT_CONTRIB = 0, 1, 3
REFERENCE_FILE = "lightgbm.txt"


class LightGBMReference:
    """LightGBM's own predictions for the set's `lightgbm.txt`, by the ways a server could call
    them. Raises FileNotFoundError when the set has no LightGBM text model."""

    def __init__(self, artifacts_dir: Path) -> None:
        import lightgbm
        from lightgbm.basic import _LIB  # type: ignore[attr-defined]  # the loaded C library

        path = Path(artifacts_dir) / REFERENCE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no {REFERENCE_FILE} (LightGBM's own model) in {artifacts_dir}"
            )
        self.booster = lightgbm.Booster(model_file=str(path))
        self.lib: Any = _LIB
        self.n_features = self.booster.num_feature()
        self.n_trees = self.booster.num_trees()
        self.cores = os.cpu_count() or 1
        self._fast: list[ctypes.c_void_p] = []

    def __del__(self) -> None:
        for handle in getattr(self, "_fast", []):
            self.lib.LGBM_FastConfigFree(handle)

    def _call(self, name: str, *args: Any) -> None:
        if getattr(self.lib, name)(*args) != 0:
            raise RuntimeError(f"{name}: {self.lib.LGBM_GetLastError().decode()}")

    def _width(self, kind: int) -> int:
        return self.n_features + 1 if kind == PREDICT_CONTRIB else 1

    # --- plain: what a naive server calls --------------------------------------------------

    def python(self, contributions: bool = False) -> Predict:
        """`Booster.predict(x)` (or `pred_contrib=True`), LightGBM's defaults: all cores."""
        booster = self.booster

        def predict(x: np.ndarray) -> np.ndarray:
            return np.asarray(booster.predict(x, pred_contrib=contributions))

        return predict

    # --- limit: the C++ prediction alone ------------------------------------------------------

    def batch(self, threads: int, kind: int = PREDICT_NORMAL) -> Predict:
        """`LGBM_BoosterPredictForMat` on a C-contiguous float64 matrix with `threads` threads:
        (n,) probabilities, (n,) raw margins or (n, n_features + 1) TreeSHAP values, the last
        column the expected value."""
        handle, call, width = self.booster._handle, self._call, self._width(kind)
        parameter = f"num_threads={threads}".encode()
        written = ctypes.c_int64(0)

        def predict(x: np.ndarray) -> np.ndarray:
            x = np.ascontiguousarray(x, dtype=np.float64)
            out = np.empty(len(x) * width)
            call(
                "LGBM_BoosterPredictForMat",
                handle,
                x.ctypes.data_as(ctypes.c_void_p),
                ctypes.c_int(DTYPE_FLOAT64),
                ctypes.c_int32(x.shape[0]),
                ctypes.c_int32(x.shape[1]),
                ctypes.c_int(1),  # row major
                ctypes.c_int(kind),
                ctypes.c_int(0),  # start iteration
                ctypes.c_int(-1),  # every tree
                ctypes.c_char_p(parameter),
                ctypes.byref(written),
                out.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
            )
            return out if width == 1 else out.reshape(len(x), width)

        return predict

    def single(self, kind: int = PREDICT_NORMAL) -> Predict:
        """One row through `LGBM_BoosterPredictForMatSingleRowFast`, 1 thread: the configuration
        (parameters, predictor) is built once here, each call only walks the trees."""
        config = ctypes.c_void_p()
        self._call(
            "LGBM_BoosterPredictForMatSingleRowFastInit",
            self.booster._handle,
            ctypes.c_int(kind),
            ctypes.c_int(0),
            ctypes.c_int(-1),
            ctypes.c_int(DTYPE_FLOAT64),
            ctypes.c_int32(self.n_features),
            ctypes.c_char_p(b"num_threads=1"),
            ctypes.byref(config),
        )
        self._fast.append(config)
        call, width = self._call, self._width(kind)
        written = ctypes.c_int64(0)

        def predict(row: np.ndarray) -> np.ndarray:
            row = np.ascontiguousarray(row, dtype=np.float64)
            out = np.empty(width)
            call(
                "LGBM_BoosterPredictForMatSingleRowFast",
                config,
                row.ctypes.data_as(ctypes.c_void_p),
                ctypes.byref(written),
                out.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
            )
            return out

        return predict


@dataclass(frozen=True)
class Agreement:
    """Ours against LightGBM on the same rows.

    * `max_dp`: max |our probability - LightGBM's| (the walk must reach the same leaves: ~1e-16);
    * `max_margin_gap`: max |base + sum of our contributions - LightGBM's raw margin| (our path
      contributions are float32: expect ~1e-6, not 1e-16);
    * `max_shap_gap`: the same for TreeSHAP (LightGBM's own values plus its expected value);
    * `top_reason_same`: among clients given at least one reason, the share whose first reason
      is TreeSHAP's first, both chosen by the API's rules (`detector.reasons`: features that
      pushed the score up, not missing, not at the typical value); `top_in_shap_top3`: the share
      whose first reason is among TreeSHAP's first three;
    * `top_feature_same`: the share of all clients whose largest contribution (no rules) is on
      the same feature in both.
    """

    rows: int
    max_dp: float
    max_margin_gap: float
    max_shap_gap: float
    explained_rows: int
    top_reason_same: float
    top_in_shap_top3: float
    top_feature_same: float
    base: float
    shap_expected_value: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def agreement(artifacts: ArtifactSet, reference: LightGBMReference, x: np.ndarray) -> Agreement:
    """Score `x` with the default model (contributions as /predict computes them) and with
    LightGBM (probability, raw margin, TreeSHAP), and compare; see `Agreement`."""
    ours = artifacts.score(x)
    assert ours.contributions is not None
    probability = reference.batch(1)(x)
    margin = reference.batch(1, PREDICT_RAW_SCORE)(x)
    shap = reference.batch(1, PREDICT_CONTRIB)(x)
    ours_reasons = explain_rows(ours.features, ours.contributions, artifacts.typical)
    shap_reasons = explain_rows(ours.features, shap[:, :-1], artifacts.typical)
    pairs = [(a, b) for a, b in zip(ours_reasons, shap_reasons, strict=True) if a]
    same = [bool(b) and a[0].feature == b[0].feature for a, b in pairs]
    in_top3 = [a[0].feature in {r.feature for r in b} for a, b in pairs]
    return Agreement(
        rows=len(x),
        max_dp=float(np.max(np.abs(ours.probability - probability))),
        max_margin_gap=float(np.max(np.abs(ours.base + ours.contributions.sum(axis=1) - margin))),
        max_shap_gap=float(np.max(np.abs(shap.sum(axis=1) - margin))),
        explained_rows=len(pairs),
        top_reason_same=float(np.mean(same)) if pairs else float("nan"),
        top_in_shap_top3=float(np.mean(in_top3)) if pairs else float("nan"),
        top_feature_same=float(
            np.mean(np.argmax(ours.contributions, axis=1) == np.argmax(shap[:, :-1], axis=1))
        ),
        base=ours.base,
        shap_expected_value=float(shap[0, -1]) if len(x) else float("nan"),
    )
