"""A verified artifact set and its models: load, check against the manifest, predict, explain.

Serving never unpickles. Training writes each model twice: the scikit-learn object
(`*.joblib`, the reference, for anyone who wants sklearn) and its arrays (`*.npz`, loaded with
`allow_pickle=False`, so loading cannot execute code). The served random forest walks all trees
at once in numpy, which gives scikit-learn's probabilities (tests check 1e-9) without its
per-tree Python overhead, and yields per-feature contributions (the path decomposition of each
tree) that become the reasons an inspector reads.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.features import FEATURE_NAMES

MANIFEST = "manifest.json"
FEATURES_FILE = "features.json"
RESULTS_FILE = "training_results.json"
SCALER_FILE = "scaler.npz"
RISK_LEVELS = ("low", "elevated", "high", "critical")


class ModelError(RuntimeError):
    """An artifact set is missing, tampered with or inconsistent; the message says which file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_manifest(directory: Path) -> dict[str, Any]:
    """Check every file listed in the manifest against its SHA-256; return the manifest."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"no {MANIFEST} in {directory}")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{manifest_path} is not a valid manifest: {exc}") from None
    for name, expected in sorted(files.items()):
        path = directory / name
        if Path(name).name != name:
            raise ModelError(f"manifest names a file outside the artifact folder: {name!r}")
        if not path.is_file():
            raise ModelError(f"artifact {name} listed in the manifest is missing from {directory}")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(
                f"artifact {name} fails its checksum (manifest {expected[:12]}..., "
                f"file {actual[:12]}...): refusing to load"
            )
    return manifest


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path.name}: {exc}") from None


@dataclass(frozen=True)
class Explained:
    """Probabilities and, per feature, how much each pushed the score (same units as `base`)."""

    probability: np.ndarray  # (n,)
    contributions: np.ndarray | None  # (n, n_features); positive = towards theft


class CompiledForest:
    """All trees of a fitted forest as flat arrays, evaluated together."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.feature = arrays["feature"].astype(np.intp)
        self.threshold = arrays["threshold"].astype(np.float64)
        self.left = arrays["left"].astype(np.intp)
        self.right = arrays["right"].astype(np.intp)
        self.value = arrays["value"].astype(np.float64)
        self.roots = arrays["roots"].astype(np.intp)
        n_nodes = len(self.feature)
        internal = self.feature >= 0
        if not (
            len(self.threshold) == len(self.left) == len(self.right) == len(self.value) == n_nodes
        ) or (internal.any() and (self.left[internal].max() >= n_nodes)):
            raise ModelError("random forest arrays are inconsistent")
        # A leaf points to itself, so a finished walk stays put and needs no masking.
        node_ids = np.arange(n_nodes)
        self.left = np.where(internal, self.left, node_ids)
        self.right = np.where(internal, self.right, node_ids)
        self.safe_feature = np.where(internal, self.feature, 0)

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    @staticmethod
    def from_sklearn(forest: Any) -> dict[str, np.ndarray]:
        """Flatten a fitted RandomForestClassifier (binary) into the arrays this class loads."""
        features, thresholds, lefts, rights, values, roots = [], [], [], [], [], []
        offset = 0
        for estimator in forest.estimators_:
            tree = estimator.tree_
            is_leaf = tree.children_left < 0
            roots.append(offset)
            features.append(np.where(is_leaf, -1, tree.feature))
            thresholds.append(tree.threshold)
            lefts.append(np.where(is_leaf, -1, tree.children_left + offset))
            rights.append(np.where(is_leaf, -1, tree.children_right + offset))
            proportions = tree.value[:, 0, :]
            values.append(proportions[:, 1] / proportions.sum(axis=1))
            offset += tree.node_count
        return {
            "feature": np.concatenate(features).astype(np.int16),
            "threshold": np.concatenate(thresholds).astype(np.float64),
            "left": np.concatenate(lefts).astype(np.int32),
            "right": np.concatenate(rights).astype(np.int32),
            "value": np.concatenate(values).astype(np.float64),
            "roots": np.asarray(roots, dtype=np.int32),
        }

    def explain(self, scaled: np.ndarray, with_contributions: bool = True) -> Explained:
        """Mean leaf probability over trees; contributions sum with the root mean to it."""
        # scikit-learn compares float32 features with float64 thresholds; do the same.
        x = scaled.astype(np.float32).astype(np.float64)
        n_rows, n_features = x.shape
        n_trees = self.n_trees
        row = np.repeat(np.arange(n_rows), n_trees)
        node = np.tile(self.roots, n_rows)
        contributions = np.zeros(n_rows * n_features) if with_contributions else None
        active = np.arange(len(node))
        while len(active):
            current = node[active]
            feature = self.safe_feature[current]
            go_left = x[row[active], feature] <= self.threshold[current]
            child = np.where(go_left, self.left[current], self.right[current])
            node[active] = child
            if contributions is not None:
                keys = row[active] * n_features + feature
                delta = self.value[child] - self.value[current]
                contributions += np.bincount(keys, weights=delta, minlength=len(contributions))
            active = active[self.feature[child] >= 0]
        probability = self.value[node].reshape(n_rows, n_trees).mean(axis=1)
        if contributions is None:
            return Explained(probability, None)
        return Explained(probability, contributions.reshape(n_rows, n_features) / n_trees)

    @property
    def base_value(self) -> float:
        return float(self.value[self.roots].mean())


class CompiledLogistic:
    """A binary logistic regression as its coefficients."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.coef = arrays["coef"].astype(np.float64).ravel()
        self.intercept = float(np.asarray(arrays["intercept"]).ravel()[0])

    @staticmethod
    def from_sklearn(model: Any) -> dict[str, np.ndarray]:
        return {
            "coef": np.asarray(model.coef_, dtype=np.float64).ravel(),
            "intercept": np.asarray(model.intercept_, dtype=np.float64).ravel(),
        }

    def explain(self, scaled: np.ndarray, with_contributions: bool = True) -> Explained:
        logit = scaled @ self.coef + self.intercept
        probability = 0.5 * (1.0 + np.tanh(0.5 * logit))  # the logistic, without overflow
        return Explained(probability, scaled * self.coef if with_contributions else None)


Compiled = CompiledForest | CompiledLogistic


@dataclass(frozen=True)
class ModelCard:
    """What the manifest says of one model: its file, threshold and risk bands."""

    name: str
    kind: str
    serving_file: str
    threshold: float
    threshold_method: str
    risk_cutoffs: tuple[float, float, float]  # elevated, high, critical: score cut-offs


@dataclass(frozen=True)
class Scores:
    """The model's answer for a batch of clients, row-aligned with the input."""

    model: str
    model_version: str
    probability: np.ndarray
    flagged: np.ndarray
    risk_level: np.ndarray  # object array of RISK_LEVELS
    features: np.ndarray  # the (imputed) feature values used
    contributions: np.ndarray | None


class ArtifactSet:
    """A verified, loaded artifact folder: feature metadata, scaler and every served model."""

    def __init__(self, directory: Path, verify: bool = True) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ModelError(f"model folder {self.directory} does not exist")
        self.manifest = (
            verify_manifest(self.directory) if verify else self._read_json(MANIFEST)
        )
        self.version: str = str(self.manifest.get("model_version", ""))
        if not self.version:
            raise ModelError(f"{MANIFEST} has no model_version")
        names = tuple(self.manifest.get("feature_names", ()))
        if names != FEATURE_NAMES:
            raise ModelError(
                "artifacts were trained on different features than this code computes: "
                f"{list(names)} != {list(FEATURE_NAMES)}"
            )
        self.features_meta: dict[str, Any] = self._read_json(FEATURES_FILE)
        self.training_results: dict[str, Any] = self._read_json(RESULTS_FILE)
        fill = {f["name"]: f["fill_value"] for f in self.features_meta["features"]}
        self.fill_values = np.array([fill[name] for name in FEATURE_NAMES], dtype=np.float64)
        self.typical = np.array(
            [f["median"] for f in self.features_meta["features"]], dtype=np.float64
        )
        scaler = _load_arrays(self.directory / SCALER_FILE)
        self.mean = scaler["mean"].astype(np.float64)
        self.scale = scaler["scale"].astype(np.float64)
        if self.mean.shape != (len(FEATURE_NAMES),) or self.scale.shape != self.mean.shape:
            raise ModelError(f"{SCALER_FILE} does not match the {len(FEATURE_NAMES)} features")
        self.default_model: str = str(self.manifest.get("default_model", "random_forest"))
        self.cards: dict[str, ModelCard] = {}
        self.models: dict[str, Compiled] = {}
        for name, entry in dict(self.manifest.get("models", {})).items():
            card = ModelCard(
                name=name,
                kind=str(entry["kind"]),
                serving_file=str(entry["serving_file"]),
                threshold=float(entry["threshold"]),
                threshold_method=str(entry["threshold_method"]),
                risk_cutoffs=tuple(float(c) for c in entry["risk_cutoffs"]),  # type: ignore[arg-type]
            )
            arrays = _load_arrays(self.directory / card.serving_file)
            compiled: Compiled
            if card.kind == "random_forest":
                compiled = CompiledForest(arrays)
            elif card.kind == "logistic_regression":
                compiled = CompiledLogistic(arrays)
            else:
                raise ModelError(f"{MANIFEST}: model {name} has unknown kind {card.kind!r}")
            self.cards[name] = card
            self.models[name] = compiled
        if self.default_model not in self.models:
            raise ModelError(f"{MANIFEST}: default model {self.default_model!r} is not in the set")

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.directory / name
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"artifact {name} is missing from {self.directory}") from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"artifact {name} is not valid JSON: {exc}") from None
        return data

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self.models)

    def resolve(self, name: str | None) -> str:
        chosen = name or self.default_model
        if chosen not in self.models:
            raise KeyError(f"unknown model {chosen!r}; available: {', '.join(self.models)}")
        return chosen

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """Impute missing values with the training medians; returns float64 (n, 14)."""
        values = np.array(features, dtype=np.float64, copy=True).reshape(-1, len(FEATURE_NAMES))
        missing = np.isnan(values)
        if missing.any():
            values[missing] = np.broadcast_to(self.fill_values, values.shape)[missing]
        return values

    def score(
        self, features: np.ndarray, model: str | None = None, with_contributions: bool = True
    ) -> Scores:
        """Score raw feature rows (columns in FEATURE_NAMES order, NaN = missing)."""
        name = self.resolve(model)
        card = self.cards[name]
        values = self.prepare(features)
        scaled = (values - self.mean) / self.scale
        explained = self.models[name].explain(scaled, with_contributions)
        probability = explained.probability
        band = np.searchsorted(np.asarray(card.risk_cutoffs), probability, side="right")
        return Scores(
            model=name,
            model_version=self.version,
            probability=probability,
            flagged=probability >= card.threshold,
            risk_level=np.asarray(RISK_LEVELS, dtype=object)[band],
            features=values,
            contributions=explained.contributions,
        )


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
