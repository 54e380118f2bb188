"""Artifact sets: manifest checks, refusal of tampered or missing files, served = sklearn."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detector.features import FEATURE_NAMES
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
    rng = np.random.default_rng(seed)
    values = artifacts.mean + rng.normal(size=(n, len(FEATURE_NAMES))) * artifacts.scale * 2
    values[rng.random(values.shape) < 0.05] = np.nan  # some missing, to be imputed
    return values


@pytest.mark.parametrize("name", ["random_forest", "logistic_regression"])
def test_served_probabilities_equal_the_sklearn_reference(
    tiny_artifacts_dir: Path, name: str
) -> None:
    import joblib

    artifacts = ArtifactSet(tiny_artifacts_dir)
    values = random_features(artifacts, 2000)
    served = artifacts.score(values, name)
    scaler = joblib.load(tiny_artifacts_dir / "scaler.joblib")
    reference = joblib.load(tiny_artifacts_dir / f"{name}.joblib")
    expected = reference.predict_proba(scaler.transform(artifacts.prepare(values)))[:, 1]
    np.testing.assert_allclose(served.probability, expected, rtol=0, atol=1e-9)


def test_forest_contributions_add_up_to_the_probability(tiny_artifacts: ArtifactSet) -> None:
    values = random_features(tiny_artifacts, 300, seed=3)
    scores = tiny_artifacts.score(values, "random_forest")
    assert scores.contributions is not None
    base = tiny_artifacts.models["random_forest"].base_value  # type: ignore[union-attr]
    # Path contributions are kept in float32: they explain, they do not score.
    np.testing.assert_allclose(
        scores.contributions.sum(axis=1) + base, scores.probability, atol=1e-6
    )
    few = tiny_artifacts.score(values[:5], "random_forest")  # the small-batch path
    assert few.contributions is not None
    np.testing.assert_allclose(few.contributions, scores.contributions[:5], atol=1e-6)


def test_one_row_scores_like_the_same_row_in_a_batch(tiny_artifacts: ArtifactSet) -> None:
    values = random_features(tiny_artifacts, 50, seed=4)
    batch = tiny_artifacts.score(values).probability
    single = [tiny_artifacts.score(values[i : i + 1]).probability[0] for i in range(50)]
    np.testing.assert_array_equal(batch, single)


def test_flag_and_risk_level_follow_the_manifest(tiny_artifacts: ArtifactSet) -> None:
    scores = tiny_artifacts.score(random_features(tiny_artifacts, 500, seed=5))
    card = tiny_artifacts.cards["random_forest"]
    np.testing.assert_array_equal(scores.flagged, scores.probability >= card.threshold)
    assert set(scores.risk_level) <= set(RISK_LEVELS)
    critical = scores.probability >= card.risk_cutoffs[2]
    assert (scores.risk_level[critical] == "critical").all()
    assert (scores.risk_level[scores.probability < card.risk_cutoffs[0]] == "low").all()


def test_missing_values_are_imputed_with_training_medians(tiny_artifacts: ArtifactSet) -> None:
    row = np.full((1, 14), np.nan)
    prepared = tiny_artifacts.prepare(row)
    np.testing.assert_array_equal(prepared[0], tiny_artifacts.fill_values)


def test_unknown_model_name_is_refused(tiny_artifacts: ArtifactSet) -> None:
    with pytest.raises(KeyError, match="unknown model 'xgboost'"):
        tiny_artifacts.score(np.zeros((1, 14)), "xgboost")


def test_tampered_file_is_refused(tiny_artifacts_dir: Path, tmp_path: Path) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    with (folder / "random_forest.npz").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match=r"random_forest\.npz fails its checksum"):
        ArtifactSet(folder)


def test_missing_file_is_named(tiny_artifacts_dir: Path, tmp_path: Path) -> None:
    folder = copy_set(tiny_artifacts_dir, tmp_path)
    (folder / "scaler.npz").unlink()
    with pytest.raises(ModelError, match=r"scaler\.npz listed in the manifest is missing"):
        ArtifactSet(folder)


# The files serving loads; everything else in a manifest is a scikit-learn reference.
SERVING = [
    "features.json",
    "logistic_regression.npz",
    "random_forest.npz",
    "scaler.npz",
    "training_results.json",
]
REFERENCES = ["logistic_regression.joblib", "random_forest.joblib", "scaler.joblib"]


def test_serving_files_leave_out_the_joblib_references(
    bundled: ArtifactSet, tiny_artifacts: ArtifactSet
) -> None:
    # The published bundled manifest works as it is: no retraining for the rule.
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
            r"serving loads random_forest\.joblib.*cannot be a \*\.joblib reference",
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
    for model in ("random_forest", "logistic_regression"):
        np.testing.assert_array_equal(
            served.score(values, model).probability, tiny_artifacts.score(values, model).probability
        )
    assert verify_manifest(folder, references_optional=True)["model_version"] == served.version
    # The full set (what `ptd publish` verifies and uploads) still needs them.
    with pytest.raises(ModelError, match=r"logistic_regression\.joblib listed in the manifest is"):
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
    assert bundled.default_model == "random_forest"
    assert set(bundled.model_names) == {"random_forest", "logistic_regression"}
    for name in bundled.manifest["files"]:
        size = (bundled.directory / name).stat().st_size
        assert size < 20 * 1024 * 1024, f"{name} is {size} bytes"
    assert bundled.manifest["libraries"]["scikit-learn"]


def test_bundled_forest_equals_its_joblib_reference(bundled: ArtifactSet) -> None:
    import joblib

    values = random_features(bundled, 1000, seed=9)
    scaler = joblib.load(bundled.directory / "scaler.joblib")
    forest = joblib.load(bundled.directory / "random_forest.joblib")
    expected = forest.predict_proba(scaler.transform(bundled.prepare(values)))[:, 1]
    np.testing.assert_allclose(bundled.score(values).probability, expected, rtol=0, atol=1e-9)
