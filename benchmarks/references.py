"""The two references every in-process row is compared with, built from the same artifacts.

* plain: the scikit-learn objects in `*.joblib` (scaler, then the random forest's predict_proba),
  loaded and queried as the seed system did, with the forest's own `n_jobs` as shipped;
* limit: the same scaler + forest compiled to ONNX (skl2onnx) and run by ONNX Runtime.

Both get the same imputation (the training medians) as the served path, in numpy, inside the
timed call. The converted ONNX model is cached by the joblib files' SHA-256 (conversion of a
150-tree forest takes ~15 s).
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CACHE = Path(tempfile.gettempdir()) / "ptd-bench-cache"

Predict = Callable[[np.ndarray], np.ndarray]


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class References:
    def __init__(self, artifacts_dir: Path, fill_values: np.ndarray) -> None:
        import joblib

        self.fill = fill_values
        scaler_path = artifacts_dir / "scaler.joblib"
        forest_path = artifacts_dir / "random_forest.joblib"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scaler: Any = joblib.load(scaler_path)
            self.forest: Any = joblib.load(forest_path)
        self.onnx_bytes = self._onnx(scaler_path, forest_path)
        self.onnx_error: str | None = None
        self._sessions: dict[int, Any] = {}

    def _onnx(self, scaler_path: Path, forest_path: Path) -> bytes:
        CACHE.mkdir(parents=True, exist_ok=True)
        cached = CACHE / f"{_digest(scaler_path, forest_path)}.onnx"
        if cached.is_file():
            return cached.read_bytes()
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
        from sklearn.pipeline import make_pipeline

        pipeline = make_pipeline(self.scaler, self.forest)
        model = to_onnx(
            pipeline,
            initial_types=[("X", FloatTensorType([None, self.fill.shape[0]]))],
            options={id(self.forest): {"zipmap": False}},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
        data: bytes = model.SerializeToString()
        cached.write_bytes(data)
        return data

    def session(self, threads: int) -> Any:
        if threads not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self._sessions[threads] = ort.InferenceSession(
                self.onnx_bytes, options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[threads]

    def impute(self, raw: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(raw), self.fill, raw)

    def sklearn(self) -> Predict:
        scaler, forest, impute = self.scaler, self.forest, self.impute

        def predict(raw: np.ndarray) -> np.ndarray:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out: np.ndarray = forest.predict_proba(scaler.transform(impute(raw)))[:, 1]
            return out

        return predict

    def onnx(self, threads: int) -> Predict:
        session, impute = self.session(threads), self.impute
        _label, proba = (o.name for o in session.get_outputs())

        def predict(raw: np.ndarray) -> np.ndarray:
            out: np.ndarray = session.run([proba], {"X": impute(raw).astype(np.float32)})[0][:, 1]
            return out

        return predict
