"""Artifact sets: manifest checks, refusal of tampered or missing files, served = sklearn."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.features import FEATURE_NAMES, FEATURES
from detector.model import (
    MANIFEST,
    RISK_LEVELS,
    ArtifactSet,
    ModelError,
    serving_files,
    verify_manifest,
)


def copy_set(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "set"
    shutil.copytree(source, target)
    return target


def random_features(artifacts: ArtifactSet, n: int, seed: int = 0) -> np.ndarray:
    """Feature rows around the training distribution, some values missing, codes as codes."""
    rng = np.random.default_rng(seed)
    values = artifacts.mean + rng.normal(size=(n, len(FEATURE_NAMES))) * artifacts.scale * 2
    for i, spec in enumerate(FEATURES):
        if spec.kind == "categorical":
            values[:, i] = np.round(np.abs(values[:, i]))
    values[rng.random(values.shape) < 0.05] = np.nan  # some missing
    return values


def reference_probability(artifacts: ArtifactSet, name: str, values: np.ndarray) -> np.ndarray:
    """What the training library itself predicts, from the reference file next to the arrays."""
    reference = artifacts.directory / artifacts.manifest["models"][name]["reference_file"]
    if name == "lightgbm":
        import lightgbm

        result: np.ndarray = lightgbm.Booster(model_file=str(reference)).predict(values)
        return result
    import joblib

    scaled = (artifacts.impute(values) - artifacts.mean) / artifacts.scale
    result = joblib.load(reference).predict_proba(scaled)[:, 1]
    return result


@pytest.mark.parametrize("name", ["lightgbm", "random_forest", "logistic_regression"])
def test_served_probabilities_equal_the_training_library(
    tiny_artifacts: ArtifactSet, name: str
) -> None:
    values = random_features(tiny_artifacts, 2000)
    served = tiny_artifacts.score(values, name)
    expected = reference_probability(tiny_artifacts, name, values)
    np.testing.assert_allclose(served.probability, expected, rtol=0, atol=1e-9)


def test_boosted_trees_send_missing_and_odd_codes_where_lightgbm_does(
    tiny_artifacts: ArtifactSet,
) -> None:
    """Missing values, zeros, and categorical codes that are negative, fractional, unseen or
    beyond int32 (LightGBM's CategoricalDecision casts to int): the walk agrees to 1e-12."""
    import lightgbm

    values = random_features(tiny_artifacts, 600, seed=2)
    codes = [i for i, spec in enumerate(FEATURES) if spec.kind == "categorical"]
    odd = np.array([np.nan, -3.0, -0.5, 0.0, 0.7, 101.5, 3e9, 1e15])
    for k, value in enumerate(odd):
        values[k * 50 : (k + 1) * 50, codes] = value
    values[400:500] = np.where(
        np.random.default_rng(3).random((100, len(FEATURE_NAMES))) < 0.5, 0.0, values[400:500]
    )
    booster = lightgbm.Booster(model_file=str(tiny_artifacts.directory / "lightgbm.txt"))
    margin = tiny_artifacts.score(values, "lightgbm").margin
    np.testing.assert_allclose(margin, booster.predict(values, raw_score=True), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["lightgbm", "random_forest", "logistic_regression"])
def test_contributions_add_up_to_the_margin(tiny_artifacts: ArtifactSet, name: str) -> None:
    values = random_features(tiny_artifacts, 300, seed=3)
    scores = tiny_artifacts.score(values, name)
    assert scores.contributions is not None
    # Tree path contributions are kept in float32: they explain, they do not score.
    np.testing.assert_allclose(
        scores.contributions.sum(axis=1) + scores.base, scores.margin, atol=1e-5
    )
    few = tiny_artifacts.score(values[:5], name)  # the small-batch path
    assert few.contributions is not None
    np.testing.assert_allclose(few.contributions, scores.contributions[:5], atol=1e-5)
    if name != "random_forest":  # log-odds: the margin is the logit of the probability
        np.testing.assert_allclose(
            scores.probability, 1 / (1 + np.exp(-scores.margin)), rtol=1e-7, atol=1e-15
        )


@pytest.mark.parametrize("name", ["lightgbm", "random_forest"])
def test_one_row_scores_like_the_same_row_in_a_batch(
    tiny_artifacts: ArtifactSet, name: str
) -> None:
    values = random_features(tiny_artifacts, 50, seed=4)
    batch = tiny_artifacts.score(values, name).probability
    single = [tiny_artifacts.score(values[i : i + 1], name).probability[0] for i in range(50)]
    np.testing.assert_array_equal(batch, single)


def test_flag_and_risk_level_follow_the_manifest(tiny_artifacts: ArtifactSet) -> None:
    scores = tiny_artifacts.score(random_features(tiny_artifacts, 500, seed=5))
    card = tiny_artifacts.cards["lightgbm"]
    assert scores.model == "lightgbm" == tiny_artifacts.default_model
    np.testing.assert_array_equal(scores.flagged, scores.probability >= card.threshold)
    assert set(scores.risk_level) <= set(RISK_LEVELS)
    critical = scores.probability >= card.risk_cutoffs[2]
    assert (scores.risk_level[critical] == "critical").all()
    assert (scores.risk_level[scores.probability < card.risk_cutoffs[0]] == "low").all()


def test_missing_values_are_filled_for_the_forest_not_for_boosting(
    tiny_artifacts: ArtifactSet,
) -> None:
    row = np.full((1, len(FEATURE_NAMES)), np.nan)
    np.testing.assert_array_equal(tiny_artifacts.impute(row)[0], tiny_artifacts.fill_values)
    filled = tiny_artifacts.fill_values[None, :]
    for name in ("random_forest", "logistic_regression"):
        assert (
            tiny_artifacts.score(row, name).probability
            == tiny_artifacts.score(filled, name).probability
        )
    # LightGBM learnt where missing values go: not the same as the medians.
    assert (
        tiny_artifacts.score(row, "lightgbm").probability
        != tiny_artifacts.score(filled, "lightgbm").probability
    )


def test_no_pickle_is_loaded_to_serve(
    tiny_artifacts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading and scoring every model never unpickles (joblib and LightGBM not needed)."""
    import pickle
    import sys

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("serving unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setitem(sys.modules, "joblib", None)  # importing it would fail
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    artifacts = ArtifactSet(tiny_artifacts_dir)
    for name in artifacts.model_names:
        assert len(artifacts.score(random_features(artifacts, 20), name).probability) == 20


def test_unknown_model_name_is_refused(tiny_artifacts: ArtifactSet) -> None:
    with pytest.raises(KeyError, match="unknown model 'xgboost'"):
        tiny_artifacts.score(np.zeros((1, len(FEATURE_NAMES))), "xgboost")


def test_tampered_file_is_refused(tiny_artifacts_dir: Path, tmp_path: Path) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    with (folder / "lightgbm.npz").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match=r"lightgbm\.npz fails its checksum"):
        ArtifactSet(folder)


def test_missing_file_is_named(tiny_artifacts_dir: Path, tmp_path: Path) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    (folder / "scaler.npz").unlink()
    with pytest.raises(ModelError, match=r"scaler\.npz listed in the manifest is missing"):
        ArtifactSet(folder)


# The files serving loads; everything else in a manifest is a training library's reference.
SERVING = [
    "features.json",
    "lightgbm.npz",
    "logistic_regression.npz",
    "random_forest.npz",
    "scaler.npz",
    "training_results.json",
]
REFERENCES = ["lightgbm.txt", "logistic_regression.joblib", "random_forest.joblib"]


def test_serving_files_leave_out_the_references(
    bundled: ArtifactSet, tiny_artifacts: ArtifactSet
) -> None:
    assert serving_files(bundled.manifest) == SERVING
    assert serving_files(tiny_artifacts.manifest) == SERVING
    assert sorted(set(bundled.manifest["files"]) - set(SERVING)) == REFERENCES
    for entry in bundled.manifest["models"].values():
        assert entry["serving_file"] in SERVING and entry["reference_file"] in REFERENCES


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m["files"].pop("random_forest.npz"), r"serving loads random_forest\.npz"),
        (lambda m: m["files"].pop("features.json"), r"serving loads features\.json"),
        (
            lambda m: m["models"]["random_forest"].update(serving_file="random_forest.joblib"),
            r"serving loads random_forest\.joblib.*cannot be a reference file",
        ),
        (
            lambda m: m["models"]["lightgbm"].update(reference_file="lightgbm.npz"),
            r"serving loads lightgbm\.npz.*cannot be a reference file",
        ),
        (lambda m: m.update(files=["scaler.npz"]), "not a valid manifest"),
        (lambda m: m["models"]["random_forest"].pop("serving_file"), "not a valid manifest"),
    ],
)
def test_serving_files_must_all_be_verifiable(
    tiny_artifacts_dir: Path, change: Any, message: str
) -> None:
    # Before, a serving file the manifest did not list was loaded without any checksum.
    manifest = json.loads((tiny_artifacts_dir / MANIFEST).read_text())
    change(manifest)
    with pytest.raises(ModelError, match=message):
        serving_files(manifest)


def test_absent_references_are_fine_for_serving_not_for_publishing(
    tiny_artifacts: ArtifactSet, tiny_artifacts_dir: Path, tmp_path: Path
) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    for name in REFERENCES:
        (folder / name).unlink()
    served = ArtifactSet(folder)
    values = random_features(tiny_artifacts, 300, seed=7)
    for model in ("lightgbm", "random_forest", "logistic_regression"):
        np.testing.assert_array_equal(
            served.score(values, model).probability, tiny_artifacts.score(values, model).probability
        )
    assert verify_manifest(folder, references_optional=True)["model_version"] == served.version
    # The full set (what `ptd publish` verifies and uploads) still needs them.
    with pytest.raises(ModelError, match=r"lightgbm\.txt listed in the manifest is"):
        verify_manifest(folder)


@pytest.mark.parametrize("name", REFERENCES)
def test_present_but_tampered_reference_is_refused(
    tiny_artifacts_dir: Path, tmp_path: Path, name: str
) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    with (folder / name).open("ab") as handle:
        handle.write(b"\0")
    pattern = f"{re.escape(name)} fails its checksum"
    with pytest.raises(ModelError, match=pattern):
        ArtifactSet(folder)
    with pytest.raises(ModelError, match=pattern):
        verify_manifest(folder, references_optional=True)


@pytest.mark.parametrize("name", SERVING)
def test_missing_serving_file_is_refused_even_when_references_are_optional(
    tiny_artifacts_dir: Path, tmp_path: Path, name: str
) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    (folder / name).unlink()
    with pytest.raises(ModelError, match=f"{re.escape(name)} listed in the manifest is missing"):
        ArtifactSet(folder)


def test_missing_manifest_and_folder(tiny_artifacts_dir: Path, tmp_path: Path) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    (folder / MANIFEST).unlink()
    with pytest.raises(ModelError, match=r"no manifest\.json"):
        ArtifactSet(folder)
    with pytest.raises(ModelError, match="does not exist"):
        ArtifactSet(tmp_path / "nowhere")


def test_manifest_path_escape_is_refused(tiny_artifacts_dir: Path, tmp_path: Path) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../outside.npz"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="outside the artifact folder"):
        ArtifactSet(folder)


def test_features_mismatch_is_refused(tiny_artifacts_dir: Path, tmp_path: Path) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["feature_names"] = manifest["feature_names"][::-1]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    # An unverified load reaches the consistency check: the features must match the code's.
    with pytest.raises(ModelError, match="different features"):
        ArtifactSet(folder, verify=False)


def test_serving_files_cannot_execute_code(tiny_artifacts_dir: Path, tmp_path: Path) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    np.save(folder / "payload.npy", np.array([object()], dtype=object))
    (folder / "payload.npy").rename(folder / "scaler.npz")
    manifest = json.loads((folder / MANIFEST).read_text())
    from detector.model import sha256_file

    manifest["files"]["scaler.npz"] = sha256_file(folder / "scaler.npz")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"cannot read scaler\.npz"):
        ArtifactSet(folder)


def test_bundled_artifacts_verify_and_stay_small(bundled: ArtifactSet) -> None:
    assert bundled.default_model == "lightgbm"
    assert set(bundled.model_names) == {"lightgbm", "random_forest", "logistic_regression"}
    for name in bundled.manifest["files"]:
        size = (bundled.directory / name).stat().st_size
        assert size < 20 * 1024 * 1024, f"{name} is {size} bytes"
    assert bundled.manifest["libraries"]["lightgbm"]


@pytest.mark.parametrize("name", ["lightgbm", "random_forest", "logistic_regression"])
def test_bundled_models_equal_their_training_library(bundled: ArtifactSet, name: str) -> None:
    values = random_features(bundled, 3000, seed=9)
    served = bundled.score(values, name).probability
    np.testing.assert_allclose(
        served, reference_probability(bundled, name, values), rtol=0, atol=1e-9
    )


def test_bundled_model_on_real_clients_equals_lightgbm(
    bundled: ArtifactSet, shared_data: Path
) -> None:
    """Real feature rows, from the first 100,000 invoice rows of the shared data."""
    import pandas as pd

    from detector.features import compute_features
    from detector.schema import prepare_clients, prepare_invoices

    invoices = pd.read_parquet(shared_data / "invoices_train.parquet").head(100_000)
    clients = pd.read_parquet(shared_data / "clients_train.parquet")
    features = compute_features(prepare_invoices(invoices).frame, prepare_clients(clients))
    values = features.to_numpy(dtype=np.float64)
    served = bundled.score(values, "lightgbm").probability
    np.testing.assert_allclose(
        served, reference_probability(bundled, "lightgbm", values), rtol=0, atol=1e-9
    )


def _tree(**changes: Any) -> dict[str, np.ndarray]:
    """One stump on feature 0 (leaves 1 and 2), changed as asked."""
    arrays = {
        "feature": np.array([0, -1, -1]),
        "threshold": np.array([0.5, 0.0, 0.0]),
        "left": np.array([1, -1, -1]),
        "right": np.array([2, -1, -1]),
        "value": np.array([0.0, -1.0, 1.0]),
        "roots": np.array([0]),
    }
    arrays.update({k: np.asarray(v) for k, v in changes.items()})
    return arrays


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"left": np.array([0, -1, -1])}, "point forward"),  # a cycle: the root is its child
        ({"right": np.array([7, -1, -1])}, "point forward"),  # out of range
        ({"value": np.array([0.0, np.nan, 1.0])}, "not finite"),
        ({"threshold": np.array([np.nan, 0.0, 0.0])}, "threshold is NaN"),
        ({"feature": np.array([99, -1, -1])}, "feature >= 30"),
        ({"value": np.array([0.0, 1.0])}, r"'value' has \(2,\)"),
        ({"roots": np.array([0, 1])}, "two parents|unreachable|point forward"),
        ({"category_set": np.array([0, -1, -1])}, "unknown category set"),
    ],
)
def test_inconsistent_tree_arrays_are_refused(changes: dict[str, Any], message: str) -> None:
    from detector.model import CompiledTrees, TreeError

    CompiledTrees(_tree(), "sum", 30)  # the unchanged stump is fine
    with pytest.raises(TreeError, match=message):
        CompiledTrees(_tree(**changes), "sum", 30)


def test_every_client_in_the_top_5_percent_gets_a_reason(
    bundled: ArtifactSet, shared_data: Path
) -> None:
    """The clients an inspector visits first each come with at least one reason in words."""
    import pandas as pd

    from detector.features import compute_features
    from detector.reasons import explain_rows
    from detector.schema import prepare_clients, prepare_invoices

    invoices = pd.read_parquet(shared_data / "invoices_train.parquet").head(600_000)
    clients = pd.read_parquet(shared_data / "clients_train.parquet")
    features = compute_features(prepare_invoices(invoices).frame, prepare_clients(clients))
    scores = bundled.score(features.to_numpy(dtype=np.float64))
    top = np.argsort(-scores.probability)[: max(1, len(features) // 20)]
    assert scores.contributions is not None
    reasons = explain_rows(scores.features[top], scores.contributions[top], bundled.typical)
    assert all(len(r) >= 1 for r in reasons)
    assert all(r.text and "nan" not in r.text for row in reasons for r in row)


@pytest.mark.parametrize("name", ["lightgbm", "random_forest", "logistic_regression"])
def test_rows_explained_in_blocks_equal_rows_explained_at_once(
    tiny_artifacts: ArtifactSet, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks bound the memory of the leaf ids ((rows, trees) int64: 4.4 GB for 1.5 M rows);
    they must not change a single number."""
    from detector.model.trees import CompiledTrees

    values = random_features(tiny_artifacts, 1_000, seed=11)
    whole = tiny_artifacts.score(values, name)
    monkeypatch.setattr(CompiledTrees, "EXPLAIN_BLOCK_ROWS", 97)
    blocked = tiny_artifacts.score(values, name)
    np.testing.assert_array_equal(blocked.probability, whole.probability)
    np.testing.assert_array_equal(blocked.margin, whole.margin)
    assert blocked.contributions is not None and whole.contributions is not None
    # A block of at most 64 rows sums its contributions in float64, larger ones in float32
    # (trees.explain): the same rows agree to float32 precision.
    np.testing.assert_allclose(blocked.contributions, whole.contributions, rtol=1e-6, atol=1e-6)
    without = tiny_artifacts.score(values, name, with_contributions=False)
    assert without.contributions is None
    np.testing.assert_array_equal(without.probability, whole.probability)
