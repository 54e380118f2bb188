"""A verified artifact set and its models: load, check against the manifest, predict, explain.

Serving never unpickles. Training writes each model twice: the scikit-learn object
(`*.joblib`, the reference, for anyone who wants sklearn) and its arrays (`*.npz`, loaded with
`allow_pickle=False`, so loading cannot execute code). The served random forest walks all trees
at once in numpy, which gives scikit-learn's probabilities (tests check 1e-9) without its
per-tree Python overhead, and yields per-feature contributions (the path decomposition of each
tree) that become the reasons an inspector reads.

`serving_files` says which files of a manifest serving loads: the cold start downloads only
those (the `*.joblib` references stay in the store), and `verify_manifest` requires them, while a
reference file is checked whenever it is present.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.features import FEATURE_NAMES

MANIFEST = "manifest.json"
FEATURES_FILE = "features.json"
RESULTS_FILE = "training_results.json"
SCALER_FILE = "scaler.npz"
# Reference files are the pickled scikit-learn objects training writes next to the arrays: each
# model's `reference_file` and the scaler's `scaler.joblib`, which the manifest names nowhere but
# in `files`. The rule is the suffix: serving never unpickles, so no `*.joblib` file can be one it
# loads; that is the no-pickle invariant restated, it needs nothing new in the manifest (it holds
# for every version already published), and it errs on the safe side: any other file a future
# training adds is downloaded and verified like the arrays until someone decides otherwise.
# (Listing each model's `reference_file` would need `scaler.joblib` hard-coded beside it.)
REFERENCE_SUFFIX = ".joblib"
RISK_LEVELS = ("low", "elevated", "high", "critical")


class ModelError(RuntimeError):
    """An artifact set is missing, tampered with or inconsistent; the message says which file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def serving_files(manifest: Mapping[str, Any]) -> list[str]:
    """The files of the manifest that serving needs, sorted: every listed file but the references.

    These are what a cold start downloads (with manifest.json itself). Raises ModelError if the
    manifest does not list a file that `ArtifactSet` loads (the JSON files, the scaler, each
    model's `serving_file`), since such a file could not be verified.
    """
    try:
        files = manifest["files"]
        if not isinstance(files, Mapping):
            raise TypeError("'files' is not an object")
        listed = [str(name) for name in files]
        loaded = {FEATURES_FILE, RESULTS_FILE, SCALER_FILE} | {
            str(entry["serving_file"]) for entry in dict(manifest.get("models", {})).values()
        }
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{MANIFEST} is not a valid manifest: {exc!r}") from None
    serving = sorted(name for name in listed if not name.endswith(REFERENCE_SUFFIX))
    unverifiable = sorted(loaded - set(serving))
    if unverifiable:
        raise ModelError(
            f"manifest: serving loads {', '.join(unverifiable)}, which must be listed in its files "
            "and cannot be a *.joblib reference"
        )
    return serving


def verify_manifest(directory: Path, *, references_optional: bool = False) -> dict[str, Any]:
    """Check the files listed in the manifest against their SHA-256; return the manifest.

    Every serving file (`serving_files`) must be present and match. So must every reference
    file, unless `references_optional` (serving, whose cold start does not download them): then
    an absent reference file is skipped, but one that is present is still checked, so a
    tampered file is never accepted. Publishing verifies the full set.
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"no {MANIFEST} in {directory}")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        files: dict[str, str] = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelError(f"{manifest_path} is not a valid manifest: {exc}") from None
    serving = set(serving_files(manifest))
    for name, expected in sorted(files.items()):
        path = directory / name
        if Path(name).name != name:
            raise ModelError(f"manifest names a file outside the artifact folder: {name!r}")
        if not path.is_file():
            if references_optional and name not in serving:
                continue  # a reference file: serving never reads it, the cold start skips it
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
    """All trees of a fitted forest as flat arrays, evaluated together.

    At load the nodes are renumbered breadth-first so that a node's right child follows its left
    child; one packed code per node (left child << 4 | feature) then makes each step of the walk
    two gathers and a compare. Leaves point to themselves with an infinite threshold, so a
    finished walk stays put. Each node also carries the sum of the score changes along its path,
    per feature, so contributions come from the leaves alone.
    """

    CHUNK_PAIRS = 1 << 16  # (row, tree) pairs walked at once: keeps the working set in cache

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        feature = arrays["feature"].astype(np.int64)
        threshold = arrays["threshold"].astype(np.float64)
        left = arrays["left"].astype(np.int64)
        right = arrays["right"].astype(np.int64)
        value = arrays["value"].astype(np.float64)
        roots = arrays["roots"].astype(np.int64)
        n_nodes = len(feature)
        internal = feature >= 0
        if (
            not (len(threshold) == len(left) == len(right) == len(value) == n_nodes)
            or (
                internal.any()
                and (left[internal].max() >= n_nodes or right[internal].max() >= n_nodes)
            )
            or (feature.max(initial=0) >= 16)
        ):
            raise ModelError("random forest arrays are inconsistent")
        new_id = np.full(n_nodes, -1, np.int64)
        levels = [roots]
        new_id[roots] = np.arange(len(roots))
        assigned = len(roots)
        parent_of = np.full(n_nodes, -1, np.int64)
        level = roots
        while len(level):
            parents = level[internal[level]]
            children = np.empty(2 * len(parents), np.int64)
            children[0::2], children[1::2] = left[parents], right[parents]
            parent_of[children] = np.repeat(parents, 2)
            new_id[children] = assigned + np.arange(len(children))
            assigned += len(children)
            levels.append(children)
            level = children
        if assigned != n_nodes or (new_id < 0).any():
            raise ModelError("random forest arrays are not a set of trees")
        order = np.concatenate(levels)  # old ids in the new order
        is_internal = internal[order]
        child = np.where(
            is_internal, new_id[np.where(is_internal, left[order], 0)], np.arange(n_nodes)
        )
        self.code = (child << 4) | np.where(is_internal, feature[order], 0)
        self.child = child
        self.split_feature = np.where(is_internal, feature[order], 0)
        self.threshold = np.where(is_internal, threshold[order], np.inf)
        self.value = value[order]
        self.internal = is_internal
        self.roots = new_id[roots]
        # Path contributions: a child inherits its parent's and adds its own step.
        contributions = np.zeros((n_nodes, int(feature.max(initial=0)) + 1))
        for children in levels[1:]:
            parents = parent_of[children]
            rows = new_id[children]
            contributions[rows] = contributions[new_id[parents]]
            contributions[rows, feature[parents]] += value[children] - value[parents]
        # float32 halves the memory the explain gather reads; reasons need no more precision.
        self.path_contributions = contributions.astype(np.float32)

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

    def leaves(self, scaled: np.ndarray) -> np.ndarray:
        """The leaf each row reaches in each tree: (n_rows, n_trees) node ids."""
        # scikit-learn compares float32 features with float64 thresholds; do the same.
        x = np.ascontiguousarray(scaled.astype(np.float32).astype(np.float64))
        n_rows, n_features = x.shape
        if n_rows == 1:
            return self._one_row(x[0])[None, :]
        n_trees = self.n_trees
        out = np.empty((n_rows, n_trees), np.int64)
        chunk = max(1, self.CHUNK_PAIRS // n_trees)
        for start in range(0, n_rows, chunk):
            flat = x[start : start + chunk].ravel()
            rows = len(flat) // n_features
            node = np.tile(self.roots, rows)
            active = np.arange(len(node))
            current = node
            base = np.repeat(np.arange(rows) * n_features, n_trees)
            step = 0
            while True:
                code = self.code[current]
                current = (code >> 4) + (flat[base + (code & 15)] > self.threshold[current])
                step += 1
                if step % 6 == 0:  # dropping finished walks costs a pass; do it now and then
                    node[active] = current
                    keep = self.internal[current]
                    if not keep.any():
                        break
                    active, current, base = active[keep], current[keep], base[keep]
            out[start : start + rows] = node.reshape(rows, n_trees)
        return out

    def _one_row(self, x: np.ndarray) -> np.ndarray:
        """One customer (the /predict path): fewer array operations per step, no compaction."""
        node = self.roots.copy()
        while True:
            for _ in range(8):  # leaves point to themselves: extra steps are harmless
                node = self.child[node] + (x[self.split_feature[node]] > self.threshold[node])
            if not self.internal[node].any():
                return node

    def explain(self, scaled: np.ndarray, with_contributions: bool = True) -> Explained:
        """Mean leaf probability over trees; contributions sum with the root mean to it."""
        leaves = self.leaves(scaled)
        probability = self.value[leaves].mean(axis=1)
        if not with_contributions:
            return Explained(probability, None)
        n_features = scaled.shape[1]
        summed = np.zeros((len(leaves), n_features))
        paths = self.path_contributions
        width = paths.shape[1]
        if len(leaves) <= 64:
            summed[:, :width] = paths[leaves].sum(axis=1, dtype=np.float64)
        else:
            # Tree by tree, so each gather stays in cache; `take` into one reused buffer and a
            # float32 sum halve the cost of mixed-type `+=` on fresh arrays (1k rows: 17 -> 8 ms).
            total = np.zeros((len(leaves), width), np.float32)
            gathered = np.empty_like(total)
            for tree_leaves in np.ascontiguousarray(leaves.T):
                np.take(paths, tree_leaves, axis=0, out=gathered)
                total += gathered
            summed[:, :width] = total
        return Explained(probability, summed / self.n_trees)

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
            verify_manifest(self.directory, references_optional=True)
            if verify
            else self._read_json(MANIFEST)
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
