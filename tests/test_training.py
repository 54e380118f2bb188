"""Training on the synthetic fixture: artifacts, manifest, metrics, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.features import FEATURE_NAMES
from detector.model import MANIFEST, ArtifactSet, sha256_file
from detector.schema import InputError
from detector.training import precision_at_top, train
from tests.synthetic import write_steg

EXPECTED_FILES = {
    "features.json",
    "lightgbm.npz",
    "lightgbm.txt",
    "logistic_regression.joblib",
    "logistic_regression.npz",
    "random_forest.joblib",
    "random_forest.npz",
    "scaler.npz",
    "training_results.json",
}
VIEWS = {"full", "cut_12m", "cut_24m"}


def test_artifact_set_is_complete_and_checksummed(tiny_artifacts_dir: Path) -> None:
    manifest = json.loads((tiny_artifacts_dir / MANIFEST).read_text())
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, digest in manifest["files"].items():
        assert sha256_file(tiny_artifacts_dir / name) == digest
    assert len(manifest["training_data_fingerprint"]) == 64
    assert {"numpy", "scikit-learn", "lightgbm", "pandas", "python"} <= set(manifest["libraries"])
    assert manifest["model_version"] and manifest["default_model"] == "lightgbm"
    for name, entry in manifest["models"].items():
        assert entry["serving_file"] == f"{name}.npz" and entry["reference_file"] in EXPECTED_FILES
    assert manifest["feature_names"] == list(FEATURE_NAMES)


def test_results_report_the_metrics_a_utility_needs(tiny_artifacts_dir: Path) -> None:
    results = json.loads((tiny_artifacts_dir / "training_results.json").read_text())
    for name in ("lightgbm", "random_forest", "logistic_regression"):
        entry = results["models"][name]
        # Every model is judged on full histories and on histories cut 12 and 24 months back.
        assert set(entry["holdout"]) == set(entry["cross_validation"]["views"]) == VIEWS
        for view in VIEWS:
            for key in ("roc_auc", "pr_auc", "precision_top_1pct", "precision_top_5pct"):
                assert (
                    key in entry["holdout"][view]
                    and key in entry["cross_validation"]["views"][view]
                )
        holdout = entry["holdout"]["full"]
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
        assert entry["strategy"] in ("full", "augmented")
    assert results["split"]["holdout_clients"] + results["split"]["train_clients"] == 300
    # The table of candidates: each model trained on full histories and on all three views,
    # the one shipped being the better on the cut views.
    table = results["candidates"]
    assert {(c["model"], c["strategy"]) for c in table} == {
        (m, s)
        for m in ("lightgbm", "random_forest", "logistic_regression")
        for s in ("full", "augmented")
    }
    for model in ("lightgbm", "random_forest", "logistic_regression"):
        mine = [c for c in table if c["model"] == model]
        shipped = [c for c in mine if c["shipped"]]
        assert len(shipped) == 1 and shipped[0]["strategy"] == results["models"][model]["strategy"]

        def prospective(c: dict[str, Any]) -> float:
            views = c["cross_validation"]
            return float(views["cut_12m"]["roc_auc"] + views["cut_24m"]["roc_auc"])

        assert prospective(shipped[0]) == max(prospective(c) for c in mine)
    # A cut view has fewer clients: those whose whole history lies within the cut drop out.
    assert (
        results["views"]["cut_24m"]["holdout_clients"]
        <= results["views"]["full"]["holdout_clients"]
    )


def test_training_is_deterministic(
    synthetic_dir: Path, tmp_path: Path, tiny_artifacts: ArtifactSet
) -> None:
    out = tmp_path / "again"
    train(synthetic_dir, out, cv_folds=3, n_jobs=1, forest_params={"n_estimators": 15})
    again = ArtifactSet(out)
    assert again.version == tiny_artifacts.version
    values = (
        np.random.default_rng(0).normal(size=(200, len(FEATURE_NAMES))) * tiny_artifacts.scale
        + tiny_artifacts.mean
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


def test_feature_selection_ranks_candidates_and_drops_duplicates(synthetic_dir: Path) -> None:
    """On the fixture: the report ranks every varying candidate, never serves two near-twins
    (cons_mean and elec_cons_mean are one signal when 3 in 4 invoices are electricity), and
    cross-validates each size on the three views."""
    from detector.training.selection import markdown, select_features

    report = select_features(synthetic_dir, cv_folds=3, n_jobs=1, sizes=(5, 10))
    ranked = [entry["feature"] for entry in report["ranking"]]
    assert len(ranked) == report["usable_candidates"] == len(set(ranked)) > 30
    duplicates = {e["feature"]: e["duplicate_of"] for e in report["ranking"] if e["duplicate_of"]}
    assert duplicates and not set(duplicates) & set(report["chosen"])
    for name, twin in duplicates.items():
        assert ranked.index(twin) < ranked.index(name)
    size = report["chosen_size"]
    assert size in (5, 10) and report["chosen"] == [n for n in ranked if n not in duplicates][:size]
    assert set(report["cross_validation_by_size"]["10"]) == VIEWS
    assert f"| {size} (served) |" in markdown(report)


def test_the_served_size_is_the_smallest_as_good_as_the_best() -> None:
    from detector.training.selection import choose_size

    def views(cut12: float, cut24: float) -> dict[str, Any]:
        return {
            "full": {"roc_auc": 0.9},
            "cut_12m": {"roc_auc": cut12},
            "cut_24m": {"roc_auc": cut24},
        }

    by_size = {"20": views(0.80, 0.78), "30": views(0.8455, 0.8175), "40": views(0.846, 0.818)}
    assert choose_size(by_size) == 30  # within 0.001 of 40's mean
    by_size["30"] = views(0.844, 0.816)
    assert choose_size(by_size) == 40


def test_served_features_are_the_committed_selection() -> None:
    """The catalog serves what `ptd select-features` chose (docs/feature_selection.json)."""
    report = json.loads(
        (Path(__file__).parent.parent / "docs" / "feature_selection.json").read_text()
    )
    assert tuple(report["chosen"]) == FEATURE_NAMES


def test_model_card_plots_are_drawn_with_the_version_and_no_date(tmp_path: Path) -> None:
    """`ptd train --plots`: four SVGs, each titled with the model version in its metadata, and
    the same bytes when drawn again from the same scores (no date), so a retrain on the same
    data leaves the card's files unchanged."""
    from detector.training.plots import FILES, write_plots

    rng = np.random.default_rng(0)
    holdout = {
        view: (rng.integers(0, 2, 500).astype(float), rng.random(500))
        for view in ("full", "cut_12m", "cut_24m")
    }
    first = write_plots(tmp_path / "a", "v-plots", "lightgbm", holdout)
    again = write_plots(tmp_path / "b", "v-plots", "lightgbm", holdout)
    assert [p.name for p in first] == list(FILES)
    for one, two in zip(first, again, strict=True):
        text = one.read_text()
        assert "model v-plots</dc:title>" in text and "<dc:date>" not in text
        assert one.read_bytes() == two.read_bytes()
