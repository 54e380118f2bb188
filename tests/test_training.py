"""Training on the synthetic fixture: artifacts, manifest, metrics, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector.model import MANIFEST, ArtifactSet, sha256_file
from detector.schema import InputError
from detector.training import precision_at_top, train
from tests.synthetic import write_steg

EXPECTED_FILES = {
    "features.json",
    "logistic_regression.joblib",
    "logistic_regression.npz",
    "random_forest.joblib",
    "random_forest.npz",
    "scaler.joblib",
    "scaler.npz",
    "training_results.json",
}


def test_artifact_set_is_complete_and_checksummed(tiny_artifacts_dir: Path) -> None:
    manifest = json.loads((tiny_artifacts_dir / MANIFEST).read_text())
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, digest in manifest["files"].items():
        assert sha256_file(tiny_artifacts_dir / name) == digest
    assert len(manifest["training_data_fingerprint"]) == 64
    assert {"numpy", "scikit-learn", "pandas", "python"} <= set(manifest["libraries"])
    assert manifest["model_version"]


def test_results_report_the_metrics_a_utility_needs(tiny_artifacts_dir: Path) -> None:
    results = json.loads((tiny_artifacts_dir / "training_results.json").read_text())
    for name in ("random_forest", "logistic_regression"):
        entry = results["models"][name]
        holdout = entry["holdout"]
        for key in (
            "roc_auc",
            "pr_auc",
            "precision_at_threshold",
            "recall_at_threshold",
            "precision_top_1pct",
            "precision_top_5pct",
            "calibration",
        ):
            assert key in holdout
        assert 0.5 < holdout["roc_auc"] <= 1.0  # the fixture's signal is learnable
        assert entry["cross_validation"]["folds"] == 3
        assert "out-of-fold" in ArtifactSet(tiny_artifacts_dir).cards[name].threshold_method
    assert results["split"]["holdout_clients"] + results["split"]["train_clients"] == 300


def test_training_is_deterministic(
    synthetic_dir: Path, tmp_path: Path, tiny_artifacts: ArtifactSet
) -> None:
    out = tmp_path / "again"
    train(synthetic_dir, out, cv_folds=3, n_jobs=1, forest_params={"n_estimators": 15})
    again = ArtifactSet(out)
    assert again.version == tiny_artifacts.version
    values = (
        np.random.default_rng(0).normal(size=(200, 14)) * tiny_artifacts.scale + tiny_artifacts.mean
    )
    for name in tiny_artifacts.model_names:
        np.testing.assert_array_equal(
            again.score(values, name).probability, tiny_artifacts.score(values, name).probability
        )


def test_training_needs_both_labels(tmp_path: Path) -> None:
    folder = write_steg(tmp_path / "data", n_clients=40, seed=2)
    import pandas as pd

    clients = pd.read_parquet(folder / "clients_train.parquet")
    clients["target"] = 0.0
    clients.to_parquet(folder / "clients_train.parquet")
    with pytest.raises(InputError, match="of each label"):
        train(folder, tmp_path / "out", cv_folds=3, n_jobs=1)


def test_training_names_a_missing_data_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="clients_train"):
        train(tmp_path, tmp_path / "out")


def test_precision_at_top() -> None:
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert precision_at_top(labels, scores, 0.1) == 1.0
    assert precision_at_top(labels, scores, 0.3) == pytest.approx(2 / 3)
